"""IPC transport: one persistent buffer of bucket regions that the trainer writes and every
engine reads, plus a control segment of counters (`control`), created once and reused every
push. Two buffer kinds run this one protocol: POSIX shared memory (`shm`, CPU) and CUDA
memory shared through an IPC handle (`cuda_ipc`). The transport's two halves, `Sender`
and `Receiver`, sit at the end of this module.

Engines map the buffer once (`attach`) and re-map only when a descriptor names another one.

Layout. `slot_bytes == 0` ("packed", the default): bucket g sits after buckets 0..g-1, so a
whole model fits and the sender never waits on engines within a push. `slot_bytes > 0`
("ring"): bucket g sits in slot g % num_slots, reused only after every live engine consumed
it. Each region holds a bucket plus its 8-byte fingerprint trailer (`integrity`).

Protocol (each counter written by one side only; seq(p, n) = (p + 1) << 20 | n grows over
pushes, so an older push's counters never pass for progress of this one):
  sender, push p:  drain push p-1 -> ready = seq(p, 0) -> for bucket g:
                     (ring) wait until live engines consumed the slot's last bucket; an engine
                     with no progress for timeout_s is evicted (evicted[e] = p + 1) and reported
                     -> pack + seal into the region -> ready = seq(p, g + 1)
                   -> (wait) until live engines consumed all; any failure sets aborted = p + 1
  engine e, push p: for bucket g: wait ready >= seq(p, g + 1), raising if the sender is on
                     another push, aborted p, or evicted e -> check trailer -> on_bucket ->
                     re-check eviction (its slot may have been reused) -> consumed[e] = seq(p, g+1)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlsync import delta
from rlsync.buckets import fingerprint, in_store, pack_bucket, plan_total_bytes
from rlsync.protocol import (
    Bucket,
    BucketPlan,
    IpcBuffer,
    StoreRef,
    UpdateAccepted,
    UpdateWeightsFromIPC,
)
from rlsync.transports import (
    OnBucket,
    TransferStats,
    TransportError,
    TransportTimeout,
    base,
    integrity,
)
from rlsync.transports.control import (
    MAX_PUSH_ID,
    SHM_DIR,
    Backoff,
    Control,
    fence,
    layout,
    region_bytes,
    remove_orphan_segments,
    seq,
    seq_push,
)
from rlsync.transports.integrity import TRAILER_BYTES
from rlsync.transports.store import MappedStore

STALE_CHECK_S = 1.0


class IpcSender:
    """Writer side of the slot protocol over a 1-D uint8 data buffer; the buffer kinds
    (`shm.ShmSender`, `cuda_ipc.CudaIpcSender`) own the buffer and add descriptor fields."""

    kind = "shm"

    def __init__(self, data: torch.Tensor, control: Control, num_slots: int, slot_bytes: int):
        self.data, self.control = data, control
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self._last: tuple[int, int, set[int]] | None = None  # push id, buckets, live engines
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def data_name(self) -> str:
        raise NotImplementedError

    def descriptor(self, engine_index: int) -> IpcBuffer:
        """What engine `engine_index` needs to attach (sent in UpdateWeightsFromIPC)."""
        if not 0 <= engine_index < self.control.num_engines:
            raise ValueError(f"engine_index {engine_index} not in [0, {self.control.num_engines})")
        return IpcBuffer(
            kind=self.kind,
            name=self.data_name,
            control_name=self.control.name,
            nbytes=self.data.numel(),
            num_slots=self.num_slots,
            slot_bytes=self.slot_bytes,
            engine_index=engine_index,
            **self._descriptor_fields(engine_index),
        )

    def _descriptor_fields(self, engine_index: int) -> dict:
        return {}

    def fits(self, plan: BucketPlan) -> bool:
        """Whether `plan` can be pushed through this buffer."""
        try:
            layout(plan, self.slot_bytes, self.num_slots, self.data.numel())
        except TransportError:
            return False
        return True

    def push(
        self,
        plan: BucketPlan,
        tensors: Mapping[str, torch.Tensor],
        push_id: int,
        *,
        verify: bool = False,
        timeout_s: float = 60.0,
        readers: Sequence[int] | None = None,
        wait: bool = True,
        fill: Callable[[int, Bucket, torch.Tensor], None] | None = None,
    ) -> TransferStats:
        """Pack bucket after bucket into its region, publishing each as ready.

        `readers` (engine indices, default: all) take part; one that makes no progress for `timeout_s` is
        evicted and listed in `timed_out_engines` while the others go on. With `wait`, return
        once every live engine consumed the whole push; else the next push waits for that
        first (engines stuck there are evicted and reported in this push's stats).
        `push_id` must grow from push to push. `fill(g, bucket, region)` writes bucket g
        instead of packing it from `tensors` (delta payloads).
        """
        t0 = time.perf_counter()
        offsets = layout(plan, self.slot_bytes, self.num_slots, self.data.numel())
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        live = self._begin(push_id, readers, stats, timeout_s)
        if not plan.buckets:
            return stats
        try:
            for g, bucket in enumerate(plan.buckets):
                if self.slot_bytes and g >= self.num_slots:  # ring: is the slot free again?
                    self._await(
                        live, seq(push_id, g - self.num_slots + 1), push_id, stats, timeout_s
                    )
                if fill is not None:
                    self._fill_with(fill, g, bucket, offsets[g], stats)
                else:
                    self._fill(g, bucket, tensors, offsets[g], verify, stats)
                fence()
                self.control.set_ready(seq(push_id, g + 1))
            self._last = (push_id, len(plan.buckets), live)
            if wait:
                self._await(live, seq(push_id, len(plan.buckets)), push_id, stats, timeout_s)
        except BaseException:
            self.control.set_aborted(push_id)  # engines fail now, not at their timeout
            raise
        stats.seconds = time.perf_counter() - t0
        return stats

    def push_direct(
        self,
        plan: BucketPlan,
        tensors: Mapping[str, torch.Tensor],
        push_id: int,
        stores: Mapping[int, torch.Tensor],
        *,
        verify: bool = False,
        timeout_s: float = 60.0,
    ) -> TransferStats:
        """One copy per byte: write every bucket of an in-store plan straight into each
        engine's own store (`stores`: engine index -> its mapped flat store), publishing
        each bucket as ready; this buffer carries only the buckets' verify trailers.

        An engine's store is written only once it says it may be (`opened`: its receive
        has begun, so it is paused or the store is its shadow); one that neither opens nor
        consumes for `timeout_s` is evicted and reported, the others go on. Returns once
        every live engine has seen the whole push.
        """
        t0 = time.perf_counter()
        if verify and self.data.numel() < TRAILER_BYTES * len(plan.buckets):
            raise TransportError(f"ipc: no room for {len(plan.buckets)} trailers")
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        live = self._begin(push_id, sorted(stores), stats, timeout_s)
        try:
            self._await(live, seq(push_id, 0), push_id, stats, timeout_s, self.control.opened)
            for g, bucket in enumerate(plan.buckets):
                t = time.perf_counter()
                regions = [
                    stores[e][bucket.store_offset : bucket.store_offset + bucket.nbytes]
                    for e in sorted(live)
                ]
                self._write(bucket, tensors, regions)
                if verify and regions:
                    self._trailer(g).copy_(fingerprint(regions[0]).reshape(1).view(torch.uint8))
                stats.add("pack", time.perf_counter() - t)
                fence()
                self.control.set_ready(seq(push_id, g + 1))
            self._last = (push_id, len(plan.buckets), live)
            self._await(live, seq(push_id, len(plan.buckets)), push_id, stats, timeout_s)
        except BaseException:
            self.control.set_aborted(push_id)
            raise
        stats.seconds = time.perf_counter() - t0
        return stats

    def _write(
        self, bucket: Bucket, tensors: Mapping[str, torch.Tensor], regions: list[torch.Tensor]
    ) -> None:
        """Copy the bucket's tensors into every engine's region; with several engines, one
        thread per engine (the copies release the GIL), so N stores cost about one copy's
        time while memory bandwidth lasts (docs/TRANSPORTS.md, several engines on a host)."""
        if len(regions) > 1:
            if self._pool is None or self._pool_size < len(regions):
                self._close_pool()
                self._pool = ThreadPoolExecutor(len(regions), thread_name_prefix="ipc-write")
                self._pool_size = len(regions)
            for done in [self._pool.submit(pack_bucket, bucket, tensors, r) for r in regions]:
                done.result()
        elif regions:
            pack_bucket(bucket, tensors, regions[0])
        for region in regions:
            if region.is_cuda:  # the bytes must be in device memory before we say "ready"
                torch.cuda.current_stream(region.device).synchronize()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _trailer(self, g: int) -> torch.Tensor:
        return self.data[TRAILER_BYTES * g : TRAILER_BYTES * (g + 1)]

    def _begin(
        self, push_id: int, readers: Sequence[int] | None, stats: TransferStats, timeout_s: float
    ) -> set[int]:
        if not 0 <= push_id <= MAX_PUSH_ID:
            raise ValueError(f"push_id {push_id} out of range")
        if self._last is not None:
            prev, count, live = self._last
            if push_id <= prev:
                raise ValueError(f"push_id {push_id} must be greater than the previous {prev}")
            self._await(live, seq(prev, count), prev, stats, timeout_s)  # drain the last push
        live = set(range(self.control.num_engines) if readers is None else readers)
        if any(not 0 <= e < self.control.num_engines for e in live):
            raise ValueError(f"readers {sorted(live)} not in [0, {self.control.num_engines})")
        self.control.set_ready(seq(push_id, 0))
        return live

    def _fill(
        self,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        offset: int,
        verify: bool,
        stats: TransferStats,
    ) -> None:
        t0 = time.perf_counter()
        region = self.data[offset : offset + region_bytes(bucket.nbytes)]
        pack_bucket(bucket, tensors, region)
        if verify:
            integrity.seal(g, region, bucket.nbytes)
        if region.is_cuda:  # the bytes must be in device memory before we say "ready"
            torch.cuda.current_stream(region.device).synchronize()
        stats.add("pack", time.perf_counter() - t0)

    def _fill_with(
        self,
        fill: Callable[[int, Bucket, torch.Tensor], None],
        g: int,
        bucket: Bucket,
        offset: int,
        stats: TransferStats,
    ) -> None:
        """Bucket g's region written by `fill` (a delta payload: it carries its own checks)."""
        t0 = time.perf_counter()
        region = self.data[offset : offset + region_bytes(bucket.nbytes)]
        fill(g, bucket, region)
        if region.is_cuda:  # the bytes must be in device memory before we say "ready"
            torch.cuda.current_stream(region.device).synchronize()
        stats.add("pack", time.perf_counter() - t0)

    def _await(
        self,
        live: set[int],
        target: int,
        push_id: int,
        stats: TransferStats,
        timeout_s: float,
        counter: Callable[[int], int] | None = None,
    ) -> None:
        """Wait until every live engine's counter (default: consumed) reaches `target`;
        evict each engine whose counter has not moved for `timeout_s`."""
        counter = counter or self.control.consumed
        t0 = time.perf_counter()
        pending = {e: (counter(e), t0) for e in live}
        backoff = Backoff()
        while pending:
            now = time.perf_counter()
            for e, (last, since) in list(pending.items()):
                value = counter(e)
                if value >= target:
                    del pending[e]
                elif value != last:
                    pending[e] = (value, now)
                elif now - since > timeout_s:
                    del pending[e]
                    self._evict(e, push_id, live, stats)
            if pending:
                backoff.pause()
        stats.add("wait", time.perf_counter() - t0)

    def _evict(self, engine: int, push_id: int, live: set[int], stats: TransferStats) -> None:
        self.control.evict(engine, push_id)
        fence()  # visible to the engine before its slot is reused
        live.discard(engine)
        stats.timed_out_engines.append(engine)

    def close(self) -> None:
        """Release the data buffer and unlink the control segment."""
        self._close_pool()
        self.data = torch.empty(0, dtype=torch.uint8)
        self._close_data()
        self.control.close()

    def _close_data(self) -> None:
        pass


class IpcReceiver:
    """Reader side of the slot protocol: maps a sender's buffer once, keeps it across pushes
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
        first_timeout_s: float | None = None,
    ) -> TransferStats:
        """Hand every bucket of push `push_id` to `on_bucket`, in order, as each becomes
        ready; every wait for the next bucket is bounded by `timeout_s` (the first by
        `first_timeout_s`, default the same) and stops early when `cancel` is set."""
        if self.buffer is None or self.control is None or self.data is None:
            raise TransportError("ipc: receive before attach")
        t0 = time.perf_counter()
        engine = self.buffer.engine_index
        offsets = layout(plan, self.buffer.slot_bytes, self.buffer.num_slots, self.data.numel())
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        for g, bucket in enumerate(plan.buckets):
            wait_s = first_timeout_s if g == 0 and first_timeout_s is not None else timeout_s
            self._await_ready(push_id, g, stats, wait_s, cancel)
            self._load(g, bucket, offsets[g], on_bucket, verify, stats)
            self._check(push_id, g)  # evicted while loading: the slot may have been reused
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
        first_timeout_s: float | None = None,
    ) -> TransferStats:
        """The engine side of `push_direct`: say the store may be written now, then follow
        the sender's progress bucket by bucket (checking each trailer with verify); the
        bytes are already home when a bucket is ready, so nothing is copied."""
        if self.buffer is None or self.control is None or self.data is None:
            raise TransportError("ipc: receive before attach")
        t0 = time.perf_counter()
        engine = self.buffer.engine_index
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        writer.open_store()
        fence()
        self.control.set_opened(engine, seq(push_id, 0))
        for g, bucket in enumerate(plan.buckets):
            wait_s = first_timeout_s if g == 0 and first_timeout_s is not None else timeout_s
            self._await_ready(push_id, g, stats, wait_s, writer.cancel)
            t = time.perf_counter()
            region = writer.region(bucket)
            assert region is not None
            if verify:
                trailer = self.data[TRAILER_BYTES * g : TRAILER_BYTES * (g + 1)]
                integrity.check_apart(g, region, trailer)
                stats.add("verify", time.perf_counter() - t)
            writer.landed(bucket)
            self._check(push_id, g)
            self.control.set_consumed(engine, seq(push_id, g + 1))
        stats.seconds = time.perf_counter() - t0
        return stats

    def _await_ready(
        self,
        push_id: int,
        g: int,
        stats: TransferStats,
        timeout_s: float,
        cancel: threading.Event | None,
    ) -> None:
        t0 = time.perf_counter()
        target, backoff = seq(push_id, g + 1), Backoff()
        while (ready := self.control.ready()) < target:
            self._check(push_id, g)
            if cancel is not None and cancel.is_set():
                raise base.Cancelled(f"ipc receive cancelled waiting for bucket {g}")
            if time.perf_counter() - t0 > timeout_s:
                raise TransportTimeout(
                    f"ipc engine {self.buffer.engine_index}: push {push_id} bucket {g} not "
                    f"ready after {timeout_s:.1f}s (sender pid {self.control.sender_pid})"
                )
            backoff.pause()
        if seq_push(ready) != push_id:
            raise TransportError(
                f"ipc engine {self.buffer.engine_index}: push {push_id} bucket "
                f"{g}: the sender is on push {seq_push(ready)}"
            )
        fence()
        stats.add("wait", time.perf_counter() - t0)

    def _check(self, push_id: int, g: int) -> None:
        engine = self.buffer.engine_index
        if self.control.aborted() == push_id + 1:
            raise TransportError(
                f"ipc engine {engine}: push {push_id} aborted by the sender (waiting on bucket {g})"
            )
        if self.control.evicted(engine) == push_id + 1:
            raise TransportTimeout(
                f"ipc engine {engine}: evicted from push {push_id} at bucket "
                f"{g}: the sender timed out waiting for it"
            )

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
        if region.is_cuda:  # the engine's copies must finish before the slot is reused
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
        buffer.num_slots,
        buffer.slot_bytes,
    )


# ---------------------------------------------------------------- buffer kinds


def make_sender(
    plan: BucketPlan | None = None,
    *,
    num_engines: int,
    device: torch.device | str | None = None,
    num_slots: int | None = None,
    capacity_bytes: int | None = None,
) -> IpcSender:
    """A CUDA buffer when `device` is a GPU, else a shared-memory one."""
    if device is not None and torch.device(device).type == "cuda":
        from rlsync.transports.cuda_ipc import CudaIpcSender

        return CudaIpcSender(
            plan,
            num_engines=num_engines,
            device=device,
            num_slots=num_slots,
            capacity_bytes=capacity_bytes,
        )
    from rlsync.transports.shm import ShmSender

    return ShmSender(
        plan, num_engines=num_engines, num_slots=num_slots, capacity_bytes=capacity_bytes
    )


def open_receiver(buffer: IpcBuffer) -> IpcReceiver:
    """A reader of the descriptor's buffer kind, attached to it."""
    if buffer.kind == "shm":
        from rlsync.transports.shm import ShmReceiver

        return ShmReceiver(buffer)
    if buffer.kind == "cuda":
        from rlsync.transports.cuda_ipc import CudaIpcReceiver

        return CudaIpcReceiver(buffer)
    raise TransportError(f"ipc: unknown buffer kind {buffer.kind!r}")


# ---------------------------------------------------------------- the two halves


class Sender(base.Sender):
    """Trainer half, two paths. A plan that follows the engines' store (`in_store`): each
    trainer tensor is copied straight into every engine's own store (mapped once, kept
    across pushes), one copy per byte, and the shared buffer carries only trailers. Any
    other plan: one persistent staging buffer every engine reads and copies from (re-made
    only when a plan no longer fits). The push id grows every push."""

    kind = "ipc"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.buffer: IpcSender | None = None
        self.direct: IpcSender | None = None
        self.push_id = 0
        self.one_copy = False
        """This push writes the engines' stores directly (its plan follows their layout)."""
        self.targets: dict[str, StoreRef] = {}
        """engine -> the store it named for this push (UpdateAccepted.store)."""
        self.stores: dict[tuple, tuple[MappedStore, int]] = {}
        """(kind, name, nbytes) -> (mapping, push id it was last written in)."""
        remove_orphan_segments()  # what a SIGKILLed pusher left in /dev/shm

    def prepare(
        self, plan: BucketPlan, tensors: base.Tensors, version: int, kind: base.PushKind
    ) -> None:
        self.push_id += 1
        self.targets.clear()
        self.one_copy = in_store(plan)  # (never for delta payloads: their plan is packed)
        if kind.payloads and not self.one_copy:  # room for the largest payloads
            plan = delta.wire_plan(plan)
        if self.one_copy:
            if self.direct is None or self.direct.data.numel() < TRAILER_BYTES * len(plan.buckets):
                self._close_buffer("direct")
                self.direct = make_sender(
                    num_engines=len(self.engines.names),
                    device=self.device,
                    capacity_bytes=TRAILER_BYTES * max(len(plan.buckets), 1),
                )
        elif self.buffer is None or not self.buffer.fits(plan):
            self._close_buffer("buffer")
            self.buffer = make_sender(plan, num_engines=len(self.engines.names), device=self.device)

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromIPC:
        buffer = self.direct if self.one_copy else self.buffer
        assert buffer is not None
        return UpdateWeightsFromIPC(
            buffer=buffer.descriptor(self.engines.index(engine)),
            plan=update.plan,
            plan_id=update.plan_id,
            push_id=self.push_id,
            **update.fields,
        )

    def accepted(self, engine: str, reply: UpdateAccepted) -> None:
        if reply.store is not None:
            self.targets[engine] = reply.store

    def send(self, plan: BucketPlan, tensors: base.Tensors, accepted: list[str]) -> None:
        if not self.one_copy:
            assert self.buffer is not None
            readers = [self.engines.index(n) for n in accepted]
            self.buffer.push(
                plan,
                tensors,
                self.push_id,
                readers=readers,
                verify=self.cfg.verify,
                timeout_s=self.cfg.timeout_s,
            )
            return
        assert self.direct is not None
        try:  # the engines that accepted are waiting: any failure here aborts them at once
            missing = [n for n in accepted if n not in self.targets]
            if missing:
                raise TransportError(f"engines {missing} named no store to write this push into")
            stores = {self.engines.index(n): self._mapped(self.targets[n]) for n in accepted}
        except Exception:
            self.direct.control.set_aborted(self.push_id)
            raise
        try:
            self.direct.push_direct(
                plan,
                tensors,
                self.push_id,
                stores,
                verify=self.cfg.verify,
                timeout_s=self.cfg.timeout_s,
            )
        finally:
            self._unmap_stale()

    def _mapped(self, ref: StoreRef) -> torch.Tensor:
        """The engine store `ref` names, mapped on first use and kept."""
        key = (ref.kind, ref.name, ref.nbytes)
        mapping = self.stores[key][0] if key in self.stores else MappedStore(ref)
        self.stores[key] = (mapping, self.push_id)
        return mapping.flat

    def _unmap_stale(self) -> None:
        """An engine writes into two stores in turn (live, shadow); one not written for two
        pushes was dropped or replaced by its engine: unmap it so its pages can go."""
        for key, (mapping, last) in list(self.stores.items()):
            if last < self.push_id - 2:
                mapping.close()
                del self.stores[key]

    def _close_buffer(self, which: str) -> None:
        buffer = getattr(self, which)
        if buffer is not None:
            buffer.close()
            setattr(self, which, None)

    def send_encoded(self, plan: BucketPlan, encode: base.Encode, accepted: list[str]) -> None:
        """Each payload is written straight into its bucket's region (header, then body)."""
        assert self.buffer is not None
        self.buffer.push(
            delta.wire_plan(plan),
            {},
            self.push_id,
            readers=[self.engines.index(n) for n in accepted],
            timeout_s=self.cfg.timeout_s,
            fill=lambda g, bucket, region: encode(g).write_into(region),
        )

    def close(self) -> None:
        self._close_buffer("buffer")
        self._close_buffer("direct")
        for mapping, _ in self.stores.values():
            mapping.close()
        self.stores.clear()


class Receiver(base.Receiver):
    """Engine half: one mapped buffer per buffer kind, opened on first use and re-mapped only
    when a push names another buffer. Between updates, a buffer whose sender closed it (its
    control segment is gone) is unmapped so it does not stay resident in the engine."""

    kind = "ipc"

    def __init__(self) -> None:
        self.readers: dict[str, IpcReceiver] = {}
        self.next_check = 0.0
        self.active = False

    def check(
        self, msg: UpdateWeightsFromIPC, plan: BucketPlan | None, weights: base.WeightStore
    ) -> int:
        if msg.buffer.kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("buffer.kind 'cuda' but this engine has no CUDA device")
        if plan is not None and in_store(plan) and getattr(weights, "store_ref", None) is None:
            raise ValueError(
                "plan: follows a store layout, but this engine's weights cannot be written "
                "directly (no exposed store); push with a staging plan"
            )
        return plan_total_bytes(plan) if plan is not None else 0

    def receive(
        self, msg: UpdateWeightsFromIPC, plan: BucketPlan | None, writer: base.WeightWriter
    ) -> None:
        assert plan is not None
        if msg.delta is not None:
            self._receive_payloads(msg, plan, writer)
            return
        self.active = True
        # the pusher may wait timeout_s for other engines' accepts before it sends
        bounds = dict(verify=msg.verify, timeout_s=msg.timeout_s, first_timeout_s=2 * msg.timeout_s)
        try:
            reader = self._reader(msg.buffer)
            if in_store(plan):
                reader.receive_direct(plan, msg.push_id, writer, **bounds)
            else:
                reader.receive(plan, msg.push_id, writer.on_bucket, cancel=writer.cancel, **bounds)
        finally:
            self.active = False

    def _receive_payloads(
        self, msg: UpdateWeightsFromIPC, plan: BucketPlan, writer: base.WeightWriter
    ) -> None:
        """A delta update: each region holds a payload of `rlsync.delta`, not a packed bucket."""
        self.active = True
        try:
            self._reader(msg.buffer).receive(
                delta.wire_plan(plan),
                msg.push_id,
                lambda g, _, region: delta.apply_region(g, plan.buckets[g], region, writer),
                timeout_s=msg.timeout_s,
                cancel=writer.cancel,
                first_timeout_s=2 * msg.timeout_s,
            )
        finally:
            self.active = False

    def _reader(self, buffer: IpcBuffer) -> IpcReceiver:
        current = self.readers.get(buffer.kind)
        if current is None:
            current = self.readers[buffer.kind] = open_receiver(buffer)
        else:
            current.attach(buffer)
        return current

    def busy(self) -> bool:
        return bool(self.readers) and not self.active and time.monotonic() >= self.next_check

    def poll(self) -> list:
        """Unmap buffers whose sender is gone (at most once per STALE_CHECK_S, between
        updates)."""
        if not self.busy():
            return []
        self.next_check = time.monotonic() + STALE_CHECK_S
        for kind, reader in list(self.readers.items()):
            name = reader.buffer.control_name if reader.buffer is not None else ""
            if not os.path.exists(os.path.join(SHM_DIR, name)):
                reader.close()
                del self.readers[kind]
        return []

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
