"""Benchmark rows and the arithmetic on them: best/median of repetitions, GB/s, ratios to the
memcpy limit and to our best transport, percentiles. Pure functions over plain data."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OURS_FAST = ("broadcast", "ipc", "broadcast-staged", "ipc-staged")
"""Our transports that "best of ours" is taken over (disk is reported, not a contender)."""


@dataclass(kw_only=True)
class Row:
    """One method at one model size and engine count."""

    size_gib: float
    engines: int
    method: str
    """e.g. "broadcast", "ipc", "per-tensor", "ray", "memcpy"."""
    kind: str
    """"ours", "baseline" or "limit"."""
    mode: str = "-"
    """in_place / shadow for ours; "-" otherwise."""
    bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    """End-to-end seconds of each timed repetition (warm-up excluded)."""
    block_s: list[float] = field(default_factory=list)
    """Trainer-side blocking seconds of each repetition."""
    normal_gap_ms: float | None = None
    max_gap_ms: float | None = None
    engine_pause_ms: float | None = None
    tokens_during: int | None = None
    """Fewest tokens any probed stream got while the push ran (0: it stood still)."""
    pause_note: str = ""
    """Why pause columns are empty, or what stands in for them (a baseline's load time)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Where the seconds go (medians): pack, wait, recv, load, flush, put, get, ..."""
    copies: float | None = None
    """Memory copies of each byte besides the wire itself, averaged over the bytes (None:
    not counted)."""
    verified: bool | None = None
    """Engines' weights fingerprint-equal to the trainer's after the pushes (None: not checked)."""
    error: str = ""
    x_memcpy: float | None = None
    x_ours: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.mode == "-" else f"{self.method} {self.mode}"

    @property
    def best_s(self) -> float:
        return min(self.seconds) if self.seconds else math.nan

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def gbps(self) -> float:
        """GB/s (1e9 bytes) of the best repetition."""
        return self.bytes / self.best_s / 1e9 if self.seconds and self.best_s > 0 else math.nan

    @property
    def block_median_s(self) -> float:
        return statistics.median(self.block_s) if self.block_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            label=self.label,
            best_s=_finite(self.best_s),
            median_s=_finite(self.median_s),
            gbps=_finite(self.gbps),
            block_median_s=_finite(self.block_median_s),
        )
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def add_ratios(rows: Sequence[Row]) -> None:
    """Fill x_memcpy (GB/s over the memcpy row's GB/s) and x_ours (seconds over the best of our
    broadcast/ipc rows; > 1 means slower), each within the same model size and engine count
    (memcpy is measured once per group, next in time to the rows it is compared with)."""
    for row in rows:
        if row.error or not row.seconds:
            continue
        group = [r for r in rows if r.size_gib == row.size_gib and r.engines == row.engines]
        memcpy = _best(r for r in group if r.method == "memcpy")
        ours = _best(r for r in group if r.kind == "ours" and r.method in OURS_FAST)
        if memcpy is not None:
            row.x_memcpy = row.gbps / memcpy.gbps
        if ours is not None:
            row.x_ours = row.best_s / ours.best_s


def _best(rows: Iterable[Row]) -> Row | None:
    ok = [r for r in rows if r.seconds and not r.error]
    return min(ok, key=lambda r: r.best_s) if ok else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_phases(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key median over repetitions (keys missing from a sample are skipped there)."""
    keys = sorted({k for s in samples for k in s})
    return {k: statistics.median([s[k] for s in samples if k in s]) for k in keys}
