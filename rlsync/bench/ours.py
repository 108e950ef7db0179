"""Our transports, measured the way users run them: a real `WeightPusher` pushing to real
engine processes (`launch_engine`), one pusher per (transport, load mode, engine count).

Each method: one warm-up push (buffers, groups and the shadow copy get allocated and
faulted in) -> `repeat` timed pushes on idle engines -> one probed push while every engine
streams a generate (pause_mode "in_place", so the update does not wait for idle) -> a
fingerprint check that every engine holds the trainer's bytes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from rlsync.bench.probe import StreamProbe
from rlsync.bench.stats import Row, median_phases
from rlsync.config import SyncConfig
from rlsync.plan.buckets import in_store, plan_total_bytes
from rlsync.transports.broadcast import sent_as_is
from rlsync.wire.protocol import BucketPlan
from trainer_side.sync.push_report import PushReport
from trainer_side.sync.pusher import WeightPusher

PROBE_TOKENS_BEFORE = 6
PROBE_TOKENS_AFTER = 2


def run_ours(
    row: Row,
    endpoints: Mapping[str, str],
    tensors: dict[str, torch.Tensor],
    *,
    repeat: int,
    versions: itertools.count,
    work_dir: Path,
    timeout_s: float,
    bucket_mb: float,
    probe: bool,
    device: str = "cpu",
) -> Row:
    """Fill `row` (method = transport, "-staged" for `sync.one_copy` off; mode = load mode)
    by pushing `tensors` `repeat` times (`device`: where the trainer's tensors live; "cuda"
    makes ipc a CUDA IPC push)."""
    transport = row.method.removesuffix("-staged")
    cfg = SyncConfig(
        transport=transport,  # type: ignore[arg-type]
        one_copy=not row.method.endswith("-staged"),
        load_mode=row.mode,
        pause_mode="in_place",  # type: ignore[arg-type]
        bucket_mb=bucket_mb,
        timeout_s=timeout_s,
    )
    pusher = WeightPusher(cfg, endpoints, work_dir, device=device)
    try:
        timed_push(pusher, tensors, next(versions))  # warm-up
        samples = []
        for _ in range(repeat):
            seconds, report = timed_push(pusher, tensors, next(versions))
            row.seconds.append(seconds)
            row.block_s.append(seconds)  # push() is synchronous: it returns after every ack
            samples.append(push_phases(report))
        row.phases = median_phases(samples)
        # announce/accept/done round trips, validation, commit: e2e not spent moving bytes
        row.phases["control_s"] = row.median_s - row.phases["transfer_s"]
        if probe:
            _probed_push(row, pusher, endpoints, tensors, next(versions), timeout_s)
        row.verified = not any(pusher.mismatches(tensors).values())
        assert pusher.plan is not None
        row.copies = copies_per_byte(transport, pusher.plan, tensors)
    finally:
        pusher.close()
    return row


def copies_per_byte(transport: str, plan: BucketPlan, tensors: dict[str, torch.Tensor]) -> float:
    """Memory copies of each byte besides the wire, averaged over the bytes. ipc: 1 when the
    pusher writes the engines' stores (plan in the store), 2 staged (the engine copies out
    of the shared buffer). broadcast in the store: 1 for packed buckets, 0 for tensors sent
    as they are (both land in place); staged 2 (pack, engine copy). disk: 3 (write the file,
    read it, copy into the store)."""
    if transport == "disk":
        return 3.0
    if not in_store(plan):
        return 2.0
    if transport == "ipc":
        return 1.0
    cpu = torch.device("cpu")
    packed = sum(b.nbytes for b in plan.buckets if sent_as_is(b, tensors, cpu) is None)
    return packed / max(plan_total_bytes(plan), 1)


def timed_push(
    pusher: WeightPusher, tensors: dict[str, torch.Tensor], version: int
) -> tuple[float, PushReport]:
    start = time.perf_counter()
    report = pusher.push(tensors, version)
    seconds = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"push of version {version} failed: {report.summary()}")
    return seconds, report


def push_phases(report: PushReport) -> dict[str, float]:
    """Trainer transfer time plus the slowest engine's own timings (seconds)."""
    out: dict[str, float] = {"transfer_s": report.transfer_s}
    if report.engines:
        out["engine_pause_s"] = report.engine_pause_ms / 1e3
    timings = [o.done.timings for o in report.engines.values() if o.done is not None]
    for key in ("recv_s", "load_s", "flush_s", "total_s"):
        if timings:
            out[f"engine_{key}"] = max(getattr(t, key) for t in timings)
    return out


def _probed_push(
    row: Row,
    pusher: WeightPusher,
    endpoints: Mapping[str, str],
    tensors: dict[str, torch.Tensor],
    version: int,
    timeout_s: float,
) -> None:
    """One push while every engine streams tokens: the pause as the stream saw it."""
    probes = [StreamProbe(ep, timeout_s=4 * timeout_s).start() for ep in endpoints.values()]
    try:
        for p in probes:
            p.wait_tokens(PROBE_TOKENS_BEFORE)
        start = time.perf_counter()
        _, report = timed_push(pusher, tensors, version)
        end = time.perf_counter()
        for p in probes:
            p.wait_tokens(p.count() + PROBE_TOKENS_AFTER)
    finally:
        for p in probes:
            p.stop()
    gaps = [p.gaps(start, end) for p in probes]
    row.normal_gap_ms = max(g.normal_ms for g in gaps)
    row.max_gap_ms = max(g.max_ms for g in gaps)
    row.tokens_during = min(g.during for g in gaps)
    row.engine_pause_ms = report.engine_pause_ms
    row.phases["probed_push_s"] = end - start


def ours_methods(transports: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """(method, load mode) pairs to run; disk is run in_place only."""
    out = []
    for transport in transports:
        for mode in modes:
            if transport == "disk" and mode != "in_place":
                continue
            out.append((transport, mode))
    return out
