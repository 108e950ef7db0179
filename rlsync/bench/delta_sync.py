"""`rlsync bench sync --delta`: delta pushes next to full pushes of the same weights.

Per (transport, load mode), with real engine processes and a real `WeightPusher`:
full pushes (sync.delta off; a warm-up, then `repeat` timed) -> a delta-mode pusher's first
push (no base yet, so full, as payloads) -> per changed fraction (0.1%, 1%, 10%, 100% of the
elements by default), `repeat` timed pushes, each of a fresh random update at that
fraction -> a fingerprint check that every engine holds the trainer's bytes. The updates
are made between pushes, outside the timed region. Speedup = full median / delta median.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

from rlsync.bench import model as bench_model
from rlsync.bench.sync import machine_info
from rlsync.config import SyncConfig
from trainer_side.sync.push_report import PushReport
from trainer_side.sync.pusher import WeightPusher

Log = Callable[[str], None]
FRACTIONS = (0.001, 0.01, 0.1, 1.0)


@dataclass(kw_only=True)
class DeltaBench:
    """What to run."""

    size_gib: float = 0.25
    dtype: str = "float32"
    engines: int = 1
    transports: list[str] = field(default_factory=lambda: ["broadcast", "ipc"])
    modes: list[str] = field(default_factory=lambda: ["in_place"])
    fractions: list[float] = field(default_factory=lambda: list(FRACTIONS))
    repeat: int = 3
    bucket_mb: float = 64.0
    timeout_s: float = 120.0
    layers: int = bench_model.DEFAULT_LAYERS
    engine_threads: int = 1
    trainer_threads: int = 1
    seed: int = 0
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.repeat < 1 or self.engines < 1 or not self.fractions:
            raise ValueError("repeat >= 1, engines >= 1 and at least one fraction needed")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass(kw_only=True)
class DeltaRow:
    """One (transport, mode, fraction, method) cell: e2e seconds and what moved."""

    transport: str
    mode: str
    fraction: float | None
    """Share of elements changed per push; None for the full-push rows."""
    method: str
    """"full" (sync.delta off), "delta: no base" (delta mode's first push) or "delta"."""
    seconds: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    encode_s: list[float] = field(default_factory=list)
    apply_s: list[float] = field(default_factory=list)
    changed: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["median_s"] = median(self.seconds) if self.seconds else None
        out["best_s"] = min(self.seconds) if self.seconds else None
        return out


def perturb(tensors: dict[str, torch.Tensor], fraction: float, gen: torch.Generator) -> None:
    """A new version in place: about `fraction` of each tensor's elements move by a small
    step (positions drawn with replacement, so the measured share is a little lower)."""
    for t in tensors.values():
        flat = t.view(-1)
        if fraction >= 1.0:
            flat.mul_(1.02)  # 2% moves every nonzero value, even in bf16 (7-bit mantissa)
            flat[flat == 0] = 1e-3
            continue
        k = max(1, int(flat.numel() * fraction))
        idx = torch.randint(0, flat.numel(), (k,), generator=gen)
        flat[idx] = (flat[idx].float() * 1.01 + 1e-3).to(flat.dtype)


def run_delta(bench: DeltaBench, log: Log = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the benchmark; returns {"machine", "config", "model", "rows"} (JSON-ready)."""
    from infer_side.process.client import launch_engine

    work = Path(tempfile.mkdtemp(prefix="rlsync-delta-", dir=bench.work_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(bench.trainer_threads)
    cfg = dataclasses.replace(
        bench_model.bench_model_config(bench.size_gib, bench.layers), torch_dtype=bench.dtype
    )
    tensors = {n: t.to(cfg.dtype) for n, t in bench_model.make_weights(cfg, bench.seed).items()}
    bench_model.write_bench_checkpoint(work / "ckpt", cfg, tensors)
    engines, rows = [], []
    try:
        for _ in range(bench.engines):
            engines.append(
                launch_engine(
                    work / "ckpt",
                    threads=bench.engine_threads,
                    start_timeout_s=bench.timeout_s,
                    disk_root=work,  # disk pushes write there (--work-dir may be anywhere)
                )
            )
        endpoints = {f"engine{i}": e.endpoint for i, e in enumerate(engines)}
        ctx = _Ctx(bench, endpoints, tensors, work, torch.Generator().manual_seed(bench.seed))
        for transport in bench.transports:
            for mode in bench.modes:
                rows.extend(_run_pair(ctx, transport, mode, log))
    finally:
        for e in engines:
            e.close()
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(threads)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench).items()}
    return {
        "machine": machine_info(),
        "config": config,
        "model": {**bench_model.describe(cfg, tensors), "dtype": bench.dtype},
        "rows": [r.to_dict() for r in rows],
    }


@dataclass
class _Ctx:
    bench: DeltaBench
    endpoints: dict[str, str]
    tensors: dict[str, torch.Tensor]
    work: Path
    gen: torch.Generator
    versions: Any = field(default_factory=lambda: itertools.count(1))


def _pusher(ctx: _Ctx, transport: str, mode: str, delta: bool) -> WeightPusher:
    b = ctx.bench
    cfg = SyncConfig(
        transport=transport,  # type: ignore[arg-type]
        load_mode=mode,  # type: ignore[arg-type]
        bucket_mb=b.bucket_mb,
        timeout_s=b.timeout_s,
        delta=delta,
        delta_full_every=1 << 30,  # the bench picks its full pushes itself
    )
    return WeightPusher(cfg, ctx.endpoints, ctx.work)


def _run_pair(ctx: _Ctx, transport: str, mode: str, log: Log) -> list[DeltaRow]:
    b, rows = ctx.bench, []
    full = DeltaRow(transport=transport, mode=mode, fraction=None, method="full")
    pusher = _pusher(ctx, transport, mode, delta=False)
    try:
        _timed(pusher, ctx, None, 0.01)  # warm-up
        for _ in range(b.repeat):
            _timed(pusher, ctx, full, 0.01)
    finally:
        pusher.close()
    rows.append(full)
    log(f"[{transport} {mode}] full: median {median(full.seconds):.3f}s")
    pusher = _pusher(ctx, transport, mode, delta=True)
    try:
        first = DeltaRow(transport=transport, mode=mode, fraction=None, method="delta: no base")
        _timed(pusher, ctx, first, 0.01)
        rows.append(first)
        for fraction in b.fractions:
            row = DeltaRow(transport=transport, mode=mode, fraction=fraction, method="delta")
            for _ in range(b.repeat):
                _timed(pusher, ctx, row, fraction)
            rows.append(row)
            log(
                f"[{transport} {mode}] delta {fraction:g}: median {median(row.seconds):.3f}s, "
                f"x{median(full.seconds) / median(row.seconds):.1f} vs full, "
                f"wire {median(row.wire_bytes) / 1e6:.2f} MB ({row.kinds[-1]})"
            )
        bad = {n: m for n, m in pusher.mismatches(ctx.tensors).items() if m}
        if bad:
            raise RuntimeError(f"engines differ from the trainer after the deltas: {bad}")
    finally:
        pusher.close()
    return rows


def _timed(pusher: WeightPusher, ctx: _Ctx, row: DeltaRow | None, fraction: float) -> None:
    perturb(ctx.tensors, fraction, ctx.gen)
    version = next(ctx.versions)
    start = time.perf_counter()
    report = pusher.push(ctx.tensors, version)
    seconds = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"push of version {version} failed: {report.summary()}")
    if row is not None:
        _record(row, report, seconds)


def _record(row: DeltaRow, report: PushReport, seconds: float) -> None:
    row.seconds.append(seconds)
    row.wire_bytes.append(report.wire_bytes or report.bytes)
    row.encode_s.append(report.encode_s)
    loads = [o.done.timings.load_s for o in report.engines.values() if o.done is not None]
    row.apply_s.append(max(loads, default=0.0))
    row.changed.append(report.changed_fraction if report.delta else 1.0)
    row.kinds.append(report.delta or "full")


def format_delta(result: dict) -> str:
    """The markdown table docs/BENCHMARKS.md shows."""
    m = result["model"]
    lines = [
        f"model: {m['bytes'] / (1 << 30):.3f} GiB {m['dtype']}, {m['tensors']} tensors; "
        f"{result['config']['engines']} engine(s)",
        "",
        "| transport | mode | changed | method | e2e median s | best s | x full | wire MB "
        "| encode s | engine apply s | measured changed | kind |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full: dict[tuple[str, str], float] = {}
    for r in result["rows"]:
        key = (r["transport"], r["mode"])
        if r["method"] == "full":
            full[key] = r["median_s"]
        ratio = full[key] / r["median_s"] if key in full and r["median_s"] else float("nan")
        frac = "-" if r["fraction"] is None else f"{r['fraction'] * 100:g}%"
        lines.append(
            f"| {r['transport']} | {r['mode']} | {frac} | {r['method']} | {r['median_s']:.4f} "
            f"| {r['best_s']:.4f} | {ratio:.2f} | {median(r['wire_bytes']) / 1e6:.2f} "
            f"| {median(r['encode_s']):.4f} | {median(r['apply_s']):.4f} "
            f"| {median(r['changed']) * 100:.3g}% | {_kinds(r['kinds'])} |"
        )
    return "\n".join(lines)


def _kinds(kinds: list[str]) -> str:
    """What the pushes of one row were, e.g. "delta x1, plain x4"."""
    short = [k.split(":")[1].split("(")[0].strip() if k.startswith("full:") else k for k in kinds]
    counts = {k: short.count(k) for k in dict.fromkeys(short)}
    return ", ".join(f"{k[:24]} x{n}" for k, n in counts.items())
