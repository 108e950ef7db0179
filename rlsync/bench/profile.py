"""Where a push's seconds go, measured piece by piece in this process on the same weights:
the copies our transports make, each alone, so the end-to-end rows can be explained.

- memcpy_1t / memcpy: one flat warm-to-warm copy with 1 thread / one thread per core;
- pack: the sender packing every bucket of the plan into a warm bucket buffer (our trainer
  side: one copy per tensor, cast included), with this process's threads;
- load_1t: an engine copying every bucket's views into a warm engine-layout store with 1
  thread (what each engine does per push; the engines run with one thread);
- cold_copy: the same flat copy into a freshly allocated buffer (page faults included);
- per_tensor_copy: every tensor copied into its own warm destination (291 small copies
  instead of one: the per-call overhead of many small tensors).
Best of `repeat` runs each, after one warm-up run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from infer_side.engines.weights import ModelWeights
from rlsync.bench.limits import flat_copy_source
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import bucket_views, pack_bucket, plan_buckets


def best_of(run: Callable[[], Any], repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def with_threads(n: int, run: Callable[[], Any]) -> Callable[[], Any]:
    def wrapped() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return run()
        finally:
            torch.set_num_threads(before)

    return wrapped


def profile_components(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], bucket_mb: float, repeat: int = 3
) -> dict[str, float]:
    """Seconds of each piece (see the module doc) plus their GB/s, for these weights."""
    plan = plan_buckets(
        [(n, "float32", tuple(t.shape)) for n, t in tensors.items()], int(bucket_mb * (1 << 20))
    )
    src = flat_copy_source(tensors)
    dst = torch.zeros_like(src)
    buf = torch.zeros(max(b.nbytes for b in plan.buckets), dtype=torch.uint8)
    store = ModelWeights.empty(cfg).hf_views()
    packed = [torch.zeros(b.nbytes, dtype=torch.uint8) for b in plan.buckets]
    for b, out in zip(plan.buckets, packed, strict=True):
        pack_bucket(b, tensors, out)
    copies = {n: torch.zeros_like(t) for n, t in tensors.items()}

    def load() -> None:
        for b, out in zip(plan.buckets, packed, strict=True):
            for name, view in bucket_views(b, out):
                store[name].copy_(view)

    seconds = {
        "memcpy_1t": best_of(with_threads(1, lambda: dst.copy_(src)), repeat),
        "memcpy": best_of(with_threads(os.cpu_count() or 1, lambda: dst.copy_(src)), repeat),
        "pack": best_of(lambda: [pack_bucket(b, tensors, buf) for b in plan.buckets], repeat),
        "load_1t": best_of(with_threads(1, load), repeat),
        "cold_copy": best_of(lambda: torch.empty_like(src).copy_(src), repeat),
        "per_tensor_copy": best_of(
            lambda: [copies[n].copy_(t) for n, t in tensors.items()], repeat
        ),
    }
    nbytes = src.numel()
    out: dict[str, float] = {f"{k}_s": v for k, v in seconds.items()}
    out.update({f"{k}_gbps": nbytes / v / 1e9 for k, v in seconds.items()})
    out["threads"] = float(torch.get_num_threads())
    out["buckets"] = float(len(plan.buckets))
    return out
