"""`rlsync bench commit`: how far apart engines switch to a new version (the commit skew),
`sync.commit: independent` vs `atomic`, per engine count and transport.

The skew of one push is the last engine's switch minus the first's, from the wall-clock
`committed_at` each engine stamps in its UpdateDone (same machine here, so one clock).
Independent: each engine switches when its own bytes are in, so the skew is the spread of
the receives' ends. Atomic: every engine holds the bytes in its shadow until the pusher's
CommitUpdate, so the skew is the spread of the commit messages' arrivals and handling.
Per configuration: one warm-up push, then `repeat` timed ones on shadow engines, idle or
(`busy`) each streaming a generate so that every switch waits for a step boundary; a
fingerprint check at the end.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlsync.bench import model as bench_model
from rlsync.bench.stats import percentile
from rlsync.wire.protocol import COMMIT_MODES

Log = Callable[[str], None]


@dataclass(kw_only=True)
class CommitBench:
    """What to run."""

    engines: list[int] = field(default_factory=lambda: [2, 4])
    transports: list[str] = field(default_factory=lambda: ["ipc", "broadcast"])
    commits: list[str] = field(default_factory=lambda: list(COMMIT_MODES))
    size_gib: float = 0.05
    layers: int = 8
    repeat: int = 10
    bucket_mb: float = 16.0
    timeout_s: float = 60.0
    busy: bool = False
    """Each engine streams a generate during the pushes (pause_mode in_place)."""
    engine_threads: int = 1
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.repeat < 1 or not self.engines or min(self.engines) < 2:
            raise ValueError("repeat >= 1 and engine counts >= 2 needed (skew needs two)")
        unknown = sorted(set(self.commits) - set(COMMIT_MODES))
        if unknown:
            raise ValueError(f"commits: unknown {unknown} (known: {', '.join(COMMIT_MODES)})")


def run_commit(bench: CommitBench, log: Log = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the benchmark; returns {"machine", "config", "model", "rows"} (JSON-ready)."""
    from infer_side.process.client import launch_engine
    from rlsync.bench.sync import machine_info

    work = Path(tempfile.mkdtemp(prefix="rlsync-commit-", dir=bench.work_dir))
    cfg = bench_model.bench_model_config(bench.size_gib, bench.layers)
    tensors = bench_model.make_weights(cfg)
    ckpt = bench_model.write_bench_checkpoint(work / "checkpoint", cfg, tensors)
    machine, rows, engines = machine_info(), [], []
    try:
        for _ in range(max(bench.engines)):
            engines.append(launch_engine(ckpt, kv_tokens=4096, threads=bench.engine_threads))
        versions = itertools.count(1)
        for n, transport, commit in itertools.product(
            bench.engines, bench.transports, bench.commits
        ):
            endpoints = {f"engine{i}": e.endpoint for i, e in enumerate(engines[:n])}
            row = measure(bench, endpoints, tensors, transport, commit, versions, work)
            log(format_row(row))
            rows.append(row)
    finally:
        for engine in engines:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(bench).items()},
        "model": bench_model.describe(cfg, tensors),
        "rows": rows,
    }


def measure(
    bench: CommitBench,
    endpoints: Mapping[str, str],
    tensors: dict[str, torch.Tensor],
    transport: str,
    commit: str,
    versions: itertools.count,
    work: Path,
) -> dict[str, Any]:
    """One configuration: skews (ms) and push seconds of `repeat` pushes."""
    from rlsync.config import SyncConfig
    from trainer_side.sync.pusher import WeightPusher

    cfg = SyncConfig(
        transport=transport,  # type: ignore[arg-type]
        load_mode="shadow",
        pause_mode="in_place" if bench.busy else None,
        commit=commit,  # type: ignore[arg-type]
        bucket_mb=bench.bucket_mb,
        timeout_s=bench.timeout_s,
    )
    row: dict[str, Any] = dict(engines=len(endpoints), transport=transport, commit=commit)
    pusher = WeightPusher(cfg, endpoints, work, device="cpu")
    probes = _start_probes(endpoints, bench) if bench.busy else []
    try:
        _push(pusher, tensors, next(versions))  # warm-up: shadows and buffers allocated
        reports = [_push(pusher, tensors, next(versions)) for _ in range(bench.repeat)]
        row["verified"] = not any(pusher.mismatches(tensors).values())
    finally:
        for probe in probes:
            probe.stop()
        pusher.close()
    skews = [1e3 * r.commit_skew_s for r in reports if r.commit_skew_s is not None]
    row.update(
        skew_ms_median=statistics.median(skews),
        skew_ms_p90=percentile(skews, 90),
        skew_ms_max=max(skews),
        push_s_median=statistics.median(r.seconds for r in reports),
        pause_ms_median=statistics.median(r.engine_pause_ms for r in reports),
        busy=bench.busy,
    )
    return row


def _push(pusher: Any, tensors: dict[str, torch.Tensor], version: int) -> Any:
    report = pusher.push(tensors, version)
    if report.failed:
        raise RuntimeError(f"push of version {version} failed: {report.summary()}")
    return report


def _start_probes(endpoints: Mapping[str, str], bench: CommitBench) -> list[Any]:
    from rlsync.bench.probe import StreamProbe

    probes = [StreamProbe(ep, timeout_s=4 * bench.timeout_s).start() for ep in endpoints.values()]
    for probe in probes:
        probe.wait_tokens(2)
    return probes


COLUMNS = ("N", "transport", "commit", "skew ms median", "p90", "max", "push s", "pause ms")


def format_row(r: dict[str, Any]) -> str:
    return (
        f"[{r['engines']} engines] {r['transport']} {r['commit']}: skew median "
        f"{r['skew_ms_median']:.2f} ms, max {r['skew_ms_max']:.2f} ms; push "
        f"{r['push_s_median']:.3f} s"
    )


def format_commit(result: dict[str, Any]) -> str:
    """A Markdown table of the rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        cells = [
            str(r["engines"]),
            r["transport"],
            r["commit"],
            f"{r['skew_ms_median']:.2f}",
            f"{r['skew_ms_p90']:.2f}",
            f"{r['skew_ms_max']:.2f}",
            f"{r['push_s_median']:.3f}",
            f"{r['pause_ms_median']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
