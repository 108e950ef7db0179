"""The machine's limits for moving the same bytes, against which every method is judged:

- memcpy: one copy of all the bytes from a warm flat buffer into another warm flat buffer
  (both pre-faulted), with 1 thread and with one thread per core, interleaved; the
  faster setting is the limit (on a shared box a second thread can cost more than it gives);
- raw broadcast: one gloo broadcast of one preallocated, pre-faulted buffer of all the bytes
  to N receiver processes that also hold a warm buffer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from rlsync.bench.baselines import group_specs, sender_group
from rlsync.bench.procs import Receivers
from rlsync.bench.stats import Row

LIMIT = "limit: no engine"


def flat_copy_source(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All the weights' bytes in one flat uint8 buffer (written, so faulted in)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    flat = torch.empty(total, dtype=torch.uint8)
    offset = 0
    for t in tensors.values():
        n = t.numel() * t.element_size()
        flat[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
        offset += n
    return flat


def run_memcpy(row: Row, tensors: dict[str, torch.Tensor], *, repeat: int) -> Row:
    """`repeat` copies into a warm destination per thread setting (after one warm-up each);
    the row keeps the setting with the better best time."""
    src = flat_copy_source(tensors)
    dst = torch.zeros_like(src)  # zeros writes every page: warm
    default = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in sorted({1, os.cpu_count() or 1})}
    try:
        for rep in range(repeat + 1):
            for threads, samples in times.items():
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                dst.copy_(src)
                if rep:
                    samples.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(default)
        del src, dst
    threads = min(times, key=lambda t: min(times[t]))
    row.seconds, row.block_s = times[threads], list(times[threads])
    row.phases = {"threads": float(threads), **{f"best_{t}t_s": min(v) for t, v in times.items()}}
    row.pause_note = LIMIT
    row.copies = 1.0
    return row


def run_raw_broadcast(row: Row, *, repeat: int, work_dir: Path, timeout_s: float) -> Row:
    """One broadcast of `row.bytes` bytes per repetition to `row.engines` receivers."""
    specs = group_specs("raw-broadcast", row.engines, timeout_s, nbytes=row.bytes)
    row.copies = 0.0  # the wire only
    buf = torch.ones(row.bytes, dtype=torch.uint8)
    with Receivers(specs, work_dir, timeout_s) as receivers:
        group = sender_group(specs[0])
        try:
            receivers.wait_all("ready")
            for rep in range(repeat + 1):
                t0 = time.monotonic()
                receivers.send({"cmd": "go", "rep": rep})
                group.broadcast(buf)
                t_sent = time.monotonic()
                events = receivers.wait_all("done")
                if rep:
                    row.seconds.append(max(ev["t_done"] for ev in events) - t0)
                    row.block_s.append(t_sent - t0)
        finally:
            group.destroy()
    row.pause_note = LIMIT
    return row
