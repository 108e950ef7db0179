"""Reader side of the ipc protocol (drawn in `rlsync.transports.ipc`): an engine maps a
sender's buffer and control segment once, keeps them across pushes, and follows each push
bucket by bucket (`ipc_waits.PushFollower` does the waiting and the checks). The buffer kinds
(`shm.ShmReceiver`, `cuda_ipc.CudaIpcReceiver`) open the data buffer.
"""

from __future__ import annotations

import threading
import time

import torch

from rlsync.plan.buckets import plan_total_bytes
from rlsync.transports import OnBucket, TransferStats, TransportError, base, integrity
from rlsync.transports.control import Control, fence, layout, region_bytes, seq
from rlsync.transports.integrity import TRAILER_BYTES
from rlsync.transports.ipc_waits import OPEN_SLACK_S, PushFollower
from rlsync.wire.protocol import Bucket, BucketPlan, IpcBuffer


class IpcReceiver:
    """Reader side of the ipc protocol: maps a sender's buffer once, keeps it across pushes
    and re-maps only when a descriptor names another buffer."""

    kind = "shm"

    def __init__(self, buffer: IpcBuffer | None = None):
        self.buffer: IpcBuffer | None = None
        self.control: Control | None = None
        self.data: torch.Tensor | None = None
        if buffer is not None:
            self.attach(buffer)

    def attach(self, buffer: IpcBuffer) -> None:
        """Map `buffer` unless it is the one already mapped (then only take its engine index)."""
        if buffer.kind != self.kind:
            raise TransportError(f"{type(self).__name__} cannot open a {buffer.kind!r} buffer")
        if (buffer.num_slots, buffer.slot_bytes) != (1, 0):
            raise TransportError(
                f"ipc: buffer.num_slots {buffer.num_slots} / slot_bytes {buffer.slot_bytes}: "
                "a ring of slots is no longer a layout; buckets sit one after the other "
                "(num_slots 1, slot_bytes 0)"
            )
        if self.buffer is not None and _key(self.buffer) == _key(buffer):
            if buffer.engine_index >= self.control.num_engines:
                raise TransportError(f"ipc: engine_index {buffer.engine_index} out of range")
            self.buffer = buffer
            return
        self.close()
        control = Control.open(buffer)
        try:
            self.data = self._open_data(buffer)
        except BaseException:
            control.close()
            raise
        self.buffer, self.control = buffer, control

    def receive(
        self,
        plan: BucketPlan,
        push_id: int,
        on_bucket: OnBucket,
        *,
        verify: bool = False,
        timeout_s: float = 60.0,
        cancel: threading.Event | None = None,
        start_timeout_s: float | None = None,
    ) -> TransferStats:
        """Hand every bucket of push `push_id` to `on_bucket`, in order, as each becomes
        ready. The wait for the sender to start the push (with this engine in it) is bounded
        by `start_timeout_s` (default `timeout_s`), each bucket's after that by `timeout_s`;
        every wait stops early when `cancel` is set."""
        if self.buffer is None or self.control is None or self.data is None:
            raise TransportError("ipc: receive before attach")
        t0 = time.perf_counter()
        engine = self.buffer.engine_index
        offsets = layout(plan, self.data.numel())
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        follow = PushFollower(self.control, engine, push_id, cancel)
        follow.wait_started(start_timeout_s or timeout_s, stats)
        for g, bucket in enumerate(plan.buckets):
            follow.wait_bucket(g, timeout_s, stats)
            self._load(g, bucket, offsets[g], on_bucket, verify, stats)
            follow.check(f"bucket {g}")  # evicted while loading: the sender went on without it
            self.control.set_consumed(engine, seq(push_id, g + 1))
        stats.seconds = time.perf_counter() - t0
        return stats

    def receive_direct(
        self,
        plan: BucketPlan,
        push_id: int,
        writer: base.WeightWriter,
        *,
        verify: bool = False,
        timeout_s: float = 60.0,
        start_timeout_s: float | None = None,
    ) -> TransferStats:
        """The engine side of `push_direct`: once the sender names this engine in the push
        (bounded by `start_timeout_s`, default `timeout_s`), say the store may be written
        now, then follow the sender's progress bucket by bucket (checking each trailer with
        verify); the bytes are already home when a bucket is ready, so nothing is copied.
        An engine the sender started the push without fails before it opens its store."""
        if self.buffer is None or self.control is None or self.data is None:
            raise TransportError("ipc: receive before attach")
        t0 = time.perf_counter()
        engine = self.buffer.engine_index
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        follow = PushFollower(self.control, engine, push_id, writer.cancel)
        follow.wait_named(start_timeout_s or timeout_s, stats)
        writer.open_store()
        fence()
        self.control.set_opened(engine, seq(push_id, 0))
        follow.wait_started(timeout_s + OPEN_SLACK_S, stats)  # the others open meanwhile
        for g, bucket in enumerate(plan.buckets):
            follow.wait_bucket(g, timeout_s, stats)
            t = time.perf_counter()
            region = writer.region(bucket)
            assert region is not None
            if verify:
                trailer = self.data[TRAILER_BYTES * g : TRAILER_BYTES * (g + 1)]
                integrity.check_apart(g, region, trailer)
                stats.add("verify", time.perf_counter() - t)
            writer.landed(bucket)
            follow.check(f"bucket {g}")
            self.control.set_consumed(engine, seq(push_id, g + 1))
        stats.seconds = time.perf_counter() - t0
        return stats

    def _load(
        self,
        g: int,
        bucket: Bucket,
        offset: int,
        on_bucket: OnBucket,
        verify: bool,
        stats: TransferStats,
    ) -> None:
        t0 = time.perf_counter()
        region = self.data[offset : offset + region_bytes(bucket.nbytes)]
        if verify:
            integrity.check(g, region, bucket.nbytes)
            stats.add("verify", time.perf_counter() - t0)
        t1 = time.perf_counter()
        on_bucket(g, bucket, region[: bucket.nbytes])
        if region.is_cuda:  # the engine's copies must finish before it says "consumed"
            torch.cuda.current_stream(region.device).synchronize()
        fence()
        stats.add("load", time.perf_counter() - t1)

    def _open_data(self, buffer: IpcBuffer) -> torch.Tensor:
        raise NotImplementedError

    def _close_data(self) -> None:
        pass

    def close(self) -> None:
        """Unmap the buffer and the control segment (the sender owns and unlinks them)."""
        self.data = None
        self._close_data()
        if self.control is not None:
            self.control.close()
        self.buffer, self.control = None, None


def _key(buffer: IpcBuffer) -> tuple:
    return (
        buffer.kind,
        buffer.name,
        buffer.control_name,
        buffer.nbytes,
    )
