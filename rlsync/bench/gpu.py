"""The GPU section of `rlsync bench sync` (`--gpu`, or automatically when CUDA is available).
Imports on a CPU-only torch and returns {"skipped": reason} there.

1. CUDA IPC push (our ipc transport with the trainer's tensors on the GPU; in_place and
   shadow) next to a device-to-device copy of the same bytes (the limit).
2. The origin document's claim (SGLang PR #22998): the weight-update flush with and without
   `torch.cuda.empty_cache()` (`torch_empty_cache` False vs True) while other requests
   decode. The engine flushes its KV pool only when no request holds KV, so the pushes use
   pause_mode "retract" (running requests give back their KV and resume after the update);
   with "in_place" the flush would only cut the prefix cache loose and never empty the CUDA
   cache. Reported per setting: update latency, decode-step latency (inter-token gaps of the
   decoding streams) around the flush (p50/p99), and the first steps after it, when the
   allocator must grow again if empty_cache released its cached blocks.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlsync.bench import model as bench_model
from rlsync.bench.ours import run_ours, timed_push
from rlsync.bench.probe import StreamProbe
from rlsync.bench.stats import Row, percentile
from rlsync.config import SyncConfig
from rlsync.wire.protocol import LOAD_MODES

STREAMS = 4
"""Requests decoding on the engine while it updates (each a timed token stream)."""
STREAM_TOKENS = 1000
"""Each stream's max_new_tokens (the engine reserves KV for all of it: see KV_TOKENS)."""
KV_TOKENS = 4096 + STREAMS * (STREAM_TOKENS + 64)
STEPS_AFTER = 3
"""Decode steps after the update counted as "first steps after"."""


def run_gpu(
    size_gib: float, *, repeat: int, work_dir: Path, timeout_s: float, device: str = "cuda"
) -> dict[str, Any]:
    """Both experiments on one engine on `device` (the current GPU); see the module doc."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device: run `scripts/bench_sync.sh --gpu` on a GPU machine"}
    from infer_side.process.client import launch_engine

    cfg = bench_model.bench_model_config(size_gib)
    cpu = bench_model.make_weights(cfg)
    ckpt = bench_model.write_bench_checkpoint(work_dir / f"gpu-ckpt-{size_gib:g}", cfg, cpu)
    tensors = {n: t.to(device) for n, t in cpu.items()}
    del cpu
    result: dict[str, Any] = {
        "device": _device_name(device),
        "size_gib": size_gib,
        "d2d": d2d_copy(tensors, repeat, device),
    }
    engine = launch_engine(ckpt, device=device, kv_tokens=KV_TOKENS, start_timeout_s=300.0)
    try:
        versions = itertools.count(1)
        result["ipc"] = [
            run_ours(
                Row(
                    size_gib=size_gib,
                    engines=1,
                    method="ipc",
                    kind="ours",
                    mode=mode,
                    bytes=bench_model.total_bytes(tensors),
                ),
                {"engine0": engine.endpoint},
                tensors,
                repeat=repeat,
                versions=versions,
                work_dir=work_dir,
                timeout_s=timeout_s,
                bucket_mb=256.0,
                probe=True,
                device=device,
            ).to_dict()
            for mode in LOAD_MODES
        ]
        result["flush"] = [
            flush_experiment(
                engine.endpoint,
                tensors,
                empty_cache=flag,
                pushes=max(repeat, 5),
                versions=versions,
                work_dir=work_dir,
                timeout_s=timeout_s,
                device=device,
            )
            for flag in (False, True)
        ]
    finally:
        engine.close()
    return result


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def d2d_copy(tensors: dict[str, torch.Tensor], repeat: int, device: str) -> dict[str, float]:
    """One flat copy of all the bytes between two warm buffers on the device."""
    nbytes = bench_model.total_bytes(tensors)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    times = []
    for rep in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if rep:
            times.append(time.perf_counter() - t0)
    del src, dst
    return {
        "bytes": nbytes,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "gbps": nbytes / min(times) / 1e9,
    }


def flush_experiment(
    endpoint: str,
    tensors: dict[str, torch.Tensor],
    *,
    empty_cache: bool,
    pushes: int,
    versions: itertools.count,
    work_dir: Path,
    timeout_s: float,
    device: str,
) -> dict[str, Any]:
    """`pushes` shadow pushes (pause retract) while STREAMS requests decode on the engine."""
    from trainer_side.sync.pusher import WeightPusher

    cfg = SyncConfig(
        transport="ipc",
        load_mode="shadow",
        pause_mode="retract",
        torch_empty_cache=empty_cache,
        timeout_s=timeout_s,
        bucket_mb=256.0,
    )
    pusher = WeightPusher(cfg, {"engine0": endpoint}, work_dir, device=device)
    probes: list[StreamProbe] = []
    windows: list[tuple[float, float]] = []
    updates: list[float] = []
    try:
        timed_push(pusher, tensors, next(versions))  # warm-up: buffers, shadow copy
        probes = [
            StreamProbe(endpoint, timeout_s=4 * timeout_s, max_new_tokens=STREAM_TOKENS).start()
            for _ in range(STREAMS)
        ]
        for p in probes:
            p.wait_tokens(8)
        for _ in range(pushes):
            probes[0].wait_tokens(probes[0].count() + 2 * STEPS_AFTER + 2)
            t0 = time.perf_counter()
            seconds, _ = timed_push(pusher, tensors, next(versions))
            windows.append((t0, time.perf_counter()))
            updates.append(seconds)
        for p in probes:
            p.wait_tokens(p.count() + STEPS_AFTER + 1)
    finally:
        for p in probes:
            p.stop()
        pusher.close()
    return {
        "torch_empty_cache": empty_cache,
        "pushes": pushes,
        **summarize_flush(updates, [p.times for p in probes], windows),
    }


def summarize_flush(
    updates: Sequence[float],
    streams: Sequence[Sequence[float]],
    windows: Sequence[tuple[float, float]],
) -> dict[str, float]:
    """Update latency and decode gaps: around each update (overlapping it, or among the first
    STEPS_AFTER after it), the first STEPS_AFTER after it alone, and far from any update."""
    gaps: dict[str, list[float]] = {"normal": [], "during": [], "after": []}
    for times in streams:
        for label, gap in classify_gaps(times, windows):
            gaps.setdefault(label, []).append(gap)
    around = gaps["during"] + gaps["after"]
    ms = 1e3
    return {
        "update_median_ms": statistics.median(updates) * ms,
        "update_max_ms": max(updates) * ms,
        "step_normal_p50_ms": percentile(gaps["normal"], 50) * ms,
        "step_around_p50_ms": percentile(around, 50) * ms,
        "step_around_p99_ms": percentile(around, 99) * ms,
        "first_steps_after_mean_ms": (
            statistics.fmean(gaps["after"]) * ms if gaps["after"] else float("nan")
        ),
    }


def classify_gaps(
    times: Sequence[float], windows: Sequence[tuple[float, float]], steps_after: int = STEPS_AFTER
) -> list[tuple[str, float]]:
    """(label, gap) for each inter-token gap of one stream: "prefill" (the first), "during"
    (overlaps an update window), "after" (one of the first `steps_after` gaps starting after
    a window ends) or "normal"."""
    pairs = list(zip(times[:-1], times[1:], strict=True))
    labels = ["prefill"] + ["normal"] * (len(pairs) - 1) if pairs else []
    for start, end in windows:
        after = 0
        for i, (a, b) in enumerate(pairs):
            if b > start and a < end:
                labels[i] = "during"
            elif a >= end and after < steps_after:
                labels[i] = "after" if labels[i] != "during" else "during"
                after += 1
    return [(label, b - a) for label, (a, b) in zip(labels, pairs, strict=True)]


def format_gpu(result: dict[str, Any]) -> str:
    if "skipped" in result or "error" in result:
        why = (
            f"skipped: {result['skipped']}" if "skipped" in result else f"FAILED: {result['error']}"
        )
        return f"\nGPU section: {why}\n"
    d2d = result["d2d"]
    lines = [
        f"\n### GPU: {result['device']}, {result['size_gib']:g} GiB\n",
        "| method | e2e best s | GB/s | x d2d copy | engine pause ms |",
        "|---|---|---|---|---|",
        f"| d2d copy | {d2d['best_s']:.4f} | {d2d['gbps']:.1f} | 1.00 | n/a |",
    ]
    for r in result["ipc"]:
        lines.append(
            f"| cuda ipc {r['mode']} | {r['best_s']:.4f} | {r['gbps']:.1f} | "
            f"{r['gbps'] / d2d['gbps']:.2f} | {r['engine_pause_ms']:.1f} |"
        )
    lines += [
        "",
        "| torch_empty_cache | update median ms | update max ms | step p50 ms (normal) "
        "| step p50 ms around flush | step p99 ms around flush | first steps after ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in result["flush"]:
        lines.append(
            f"| {f['torch_empty_cache']} | {f['update_median_ms']:.1f} | "
            f"{f['update_max_ms']:.1f} | {f['step_normal_p50_ms']:.2f} | "
            f"{f['step_around_p50_ms']:.2f} | {f['step_around_p99_ms']:.2f} | "
            f"{f['first_steps_after_mean_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"
