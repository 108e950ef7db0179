"""`rlsync bench sync`: every method on the same weights, per model size and engine count.

Order per size (to keep peak memory low and each comparison close in time): build the
weights and write the checkpoint once -> per engine count: memcpy and raw broadcast (the
limits) -> start the engines once, run our transports per engine count, stop the engines ->
per engine count: the baselines, each with processes of its own. A method that fails gets
a row with its error and the run goes on; every process, segment and Ray session a method
starts is ended by that method (try/finally) whether it succeeds or not.
"""

from __future__ import annotations

import gc
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlsync.bench import model as bench_model
from rlsync.bench.stats import Row, add_ratios
from rlsync.wire.protocol import LOAD_MODES, TRANSPORT_KINDS

LIMITS = ("memcpy", "raw-broadcast")
OURS = (*TRANSPORT_KINDS, "ipc-staged", "broadcast-staged")
"""Our transports; "-staged": the same with `sync.one_copy` off (a staging buffer)."""
BASELINES = ("per-tensor", "safetensors", "ray", "pickle")
ALL_METHODS = (*LIMITS, *OURS, *BASELINES)
Log = Callable[[str], None]


@dataclass(kw_only=True)
class SyncBench:
    """What to run."""

    sizes: list[float] = field(default_factory=lambda: [0.25, 1.0])
    engines: list[int] = field(default_factory=lambda: [1, 2])
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    modes: list[str] = field(default_factory=lambda: list(LOAD_MODES))
    repeat: int = 3
    bucket_mb: float = 64.0
    timeout_s: float = 120.0
    layers: int = bench_model.DEFAULT_LAYERS
    probe: bool = True
    engine_threads: int = 1
    trainer_threads: int | None = 1
    """torch threads of this (the trainer's) process while it sends, for ours and the
    baselines alike; None leaves torch's default. 1 by default: on a small shared box a
    second intra-op thread waits for a core the engines hold (measured: ipc 0.13 s with 1
    thread vs 0.16-0.34 s with 2 at 0.25 GiB)."""
    profile: bool = True
    """Also time each copy a push makes, alone (`rlsync.bench.profile`)."""
    kv_tokens: int = 4096
    work_dir: Path | None = None
    """Scratch space (checkpoints, safetensors files, Ray's files); None: a temp dir, removed."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown} (known: {', '.join(ALL_METHODS)})")
        if self.repeat < 1 or not self.sizes or not self.engines or min(self.engines) < 1:
            raise ValueError("repeat >= 1 and at least one size and engine count >= 1 needed")


def run_sync(bench: SyncBench, log: Log = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Run the benchmark; returns {"machine", "config", "models", "rows"} (JSON-ready)."""
    work = Path(tempfile.mkdtemp(prefix="rlsync-bench-", dir=bench.work_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(bench.trainer_threads or threads)
    machine = machine_info()
    rows: list[Row] = []
    models: dict[str, Any] = {}
    try:
        for size in bench.sizes:
            models[str(size)] = _run_size(bench, size, work / f"size-{size:g}", rows, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(threads)
    add_ratios(rows)
    machine["load_avg_end"] = os.getloadavg()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench).items()}
    return {
        "machine": machine,
        "config": config,
        "models": models,
        "rows": [r.to_dict() for r in rows],
    }


def _run_size(bench: SyncBench, size: float, work: Path, rows: list[Row], log: Log) -> dict:
    work.mkdir(parents=True)
    cfg = bench_model.bench_model_config(size, bench.layers)
    tensors = bench_model.make_weights(cfg)
    nbytes = bench_model.total_bytes(tensors)
    info = bench_model.describe(cfg, tensors)
    ckpt = work / "checkpoint"
    if any(m in bench.methods for m in (*OURS, "pickle")):
        bench_model.write_bench_checkpoint(ckpt, cfg, tensors)

    def new(method: str, kind: str, engines: int, mode: str = "-") -> Row:
        row = Row(size_gib=size, engines=engines, method=method, kind=kind, mode=mode, bytes=nbytes)
        rows.append(row)
        return row

    if bench.profile:
        from rlsync.bench.profile import profile_components

        info["profile"] = profile_components(cfg, tensors, bench.bucket_mb, bench.repeat)
        log(
            f"[{size:g} GiB] profile: "
            + ", ".join(
                f"{k[:-5]} {v:.2f}" for k, v in info["profile"].items() if k.endswith("_gbps")
            )
            + " GB/s"
        )
    for n in bench.engines:
        _limits(bench, new, n, tensors, work, log)
    _ours(bench, new, tensors, ckpt, work, log)
    for n in bench.engines:
        _baselines(bench, new, n, cfg, tensors, ckpt, work, log)
    del tensors
    gc.collect()
    return info


def _limits(
    bench: SyncBench, new: Callable[..., Row], n: int, tensors: dict, work: Path, log: Log
) -> None:
    from rlsync.bench.limits import run_memcpy, run_raw_broadcast

    if "memcpy" in bench.methods:
        guarded(
            new("memcpy", "limit", n), lambda r: run_memcpy(r, tensors, repeat=bench.repeat), log
        )
    if "raw-broadcast" in bench.methods:
        guarded(
            new("raw-broadcast", "limit", n),
            lambda r: run_raw_broadcast(
                r, repeat=bench.repeat, work_dir=work, timeout_s=bench.timeout_s
            ),
            log,
        )


def _ours(
    bench: SyncBench, new: Callable[..., Row], tensors: dict, ckpt: Path, work: Path, log: Log
) -> None:
    from infer_side.process.client import launch_engine
    from rlsync.bench.ours import ours_methods, run_ours

    pairs = ours_methods([m for m in OURS if m in bench.methods], bench.modes)
    if not pairs:
        return
    engines = []
    try:
        for _ in range(max(bench.engines)):
            engines.append(
                launch_engine(
                    ckpt,
                    kv_tokens=bench.kv_tokens,
                    threads=bench.engine_threads,
                    start_timeout_s=max(300.0, bench.timeout_s),
                    disk_root=work,  # disk pushes write there (--work-dir may be anywhere)
                )
            )
        versions = itertools.count(1)
        for n in bench.engines:
            endpoints = {f"engine{i}": e.endpoint for i, e in enumerate(engines[:n])}
            for transport, mode in pairs:
                guarded(
                    new(transport, "ours", n, mode),
                    partial(
                        run_ours,
                        endpoints=endpoints,
                        tensors=tensors,
                        repeat=bench.repeat,
                        versions=versions,
                        work_dir=work,
                        timeout_s=bench.timeout_s,
                        bucket_mb=bench.bucket_mb,
                        probe=bench.probe,
                    ),
                    log,
                )
    finally:
        for engine in engines:
            engine.close()


def _baselines(
    bench: SyncBench,
    new: Callable[..., Row],
    n: int,
    cfg: Any,
    tensors: dict,
    ckpt: Path,
    work: Path,
    log: Log,
) -> None:
    from rlsync.bench import baselines

    common = dict(repeat=bench.repeat, work_dir=work, timeout_s=bench.timeout_s)
    if "per-tensor" in bench.methods:
        guarded(
            new("per-tensor", "baseline", n),
            lambda r: baselines.run_per_tensor(r, cfg, tensors, **common),
            log,
        )
    if "safetensors" in bench.methods:
        guarded(
            new("safetensors", "baseline", n),
            lambda r: baselines.run_safetensors(r, cfg, tensors, **common),
            log,
        )
    if "ray" in bench.methods:
        from rlsync.bench.ray_baseline import run_ray

        ray_dir = work.parent / "ray"  # one per run: Ray caches its first auth token
        guarded(
            new("ray", "baseline", n),
            lambda r: run_ray(r, cfg, tensors, ray_dir=ray_dir, **common),
            log,
        )
    if "pickle" in bench.methods:
        guarded(
            new("pickle", "baseline", n),
            lambda r: baselines.run_pickle(r, ckpt, repeat=bench.repeat, timeout_s=bench.timeout_s),
            log,
        )


def guarded(row: Row, run: Callable[[Row], Any], log: Log) -> Row:
    """Run one method into `row`; an exception becomes the row's error (and is logged)."""
    t0 = time.perf_counter()
    try:
        run(row)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:2000]
    took = time.perf_counter() - t0
    what = f"[{row.size_gib:g} GiB, {row.engines} engine(s)] {row.label}"
    if row.error:
        log(f"{what}: FAILED after {took:.1f}s: {row.error.splitlines()[0]}")
    else:
        log(
            f"{what}: best {row.best_s:.3f}s, median {row.median_s:.3f}s, {row.gbps:.2f} GB/s "
            f"({took:.1f}s)"
        )
    return row


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "load_avg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return round(kib / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        return None


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            platform.processor(),
        )
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
