"""IPC transport: one persistent buffer of bucket regions that the trainer writes and every
engine reads, plus a control segment of counters (`control`), created once and reused every
push. Two buffer kinds run this one protocol: POSIX shared memory (`shm`, CPU) and CUDA
memory shared through an IPC handle (`cuda_ipc`). Here: the writer side (`IpcSender`, and
`BucketWriter`, the public hook that says who writes each bucket's bytes), then the
transport's two halves, `Sender` and `Receiver`, at the end. The reader side is
`ipc_reader.IpcReceiver`; the waits of both sides are `ipc_waits`.

Engines map the buffer once (`attach`) and re-map only when a descriptor names another one.

Layout: bucket g sits after buckets 0..g-1 (`control.layout`), so a whole push fits and the
sender never waits on engines within one; each region holds a bucket plus its 8-byte
fingerprint trailer (`integrity`). A direct push (one copy) writes the engines' own stores
instead and the buffer holds only the trailers. The descriptor's `num_slots`/`slot_bytes`
stay on the wire, always 1 and 0 (an engine refuses anything else).

Protocol (each counter written by one side only; seq(p, n) = (p + 1) << 20 | n grows over
pushes, so an older push's counters never pass for progress of this one):
  sender, push p:  drain push p-1 -> member[e] = p + 1 for exactly the engines taking part
                   (those that accepted), fenced -> (direct) wait until each opened its store
                   -> ready = seq(p, 0) -> for bucket g:
                     pack + seal into the region -> ready = seq(p, g + 1)
                   -> (wait) until live engines consumed all. An engine with no progress for
                   timeout_s is evicted (evicted[e] = p + 1) and reported, the others go on;
                   any failure sets aborted = p + 1
  engine e, push p: (direct) wait until member[e] = p + 1 -> opened[e] = seq(p, 0)
                   -> wait ready >= seq(p, 0) -> for bucket g: wait ready >= seq(p, g + 1)
                   -> check trailer -> on_bucket (direct: the bytes are home) -> re-check
                   (evicted meanwhile?) -> consumed[e] = seq(p, g + 1)
  Every check of the engine raises if the sender aborted p, evicted e, is on a later push, or
  is on push p without member[e] = p + 1: the counters an engine that accepted too late (a
  frozen one, thawed) sees were advanced for the others, not for it, so it commits nothing.
  An engine whose update fails (before it opened its store, or at any point) writes
  declined[e] = p + 1; the sender evicts it at its next look instead of after timeout_s.
  Bounds of an engine's waits: the start (named, for direct) 2 x timeout_s (the pusher may
  spend timeout_s on the other engines' accepts), each bucket after it timeout_s; and every
  0.2 s it checks the sender still holds the control segment's flock (gone: fail at once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlsync.plan import delta
from rlsync.plan.buckets import fingerprint, in_store, pack_bucket, plan_total_bytes
from rlsync.transports import (
    TransferStats,
    TransportError,
    base,
    integrity,
)
from rlsync.transports.control import (
    MAX_PUSH_ID,
    SHM_DIR,
    Control,
    fence,
    layout,
    region_bytes,
    remove_orphan_segments,
    seq,
)
from rlsync.transports.integrity import TRAILER_BYTES
from rlsync.transports.ipc_reader import IpcReceiver
from rlsync.transports.ipc_waits import await_engines, name_members
from rlsync.transports.store import MappedStores
from rlsync.wire.protocol import (
    Bucket,
    BucketPlan,
    IpcBuffer,
    StoreRef,
    UpdateAccepted,
    UpdateWeightsFromIPC,
)

STALE_CHECK_S = 1.0


class BucketWriter:
    """How an `IpcSender` writes the bytes of each bucket: the public hook through which the
    writers of a push can be others than this process (a sharded trainer, every rank writing
    its own rows: `rlsync.transports.sharded.buffer.RankRows`). This default packs each bucket from
    the trainer's tensors; with several regions, one thread per region (the copies release
    the GIL, so N engine stores cost about one copy's time while memory bandwidth lasts,
    docs/TRANSPORTS.md, several engines on a host)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def begin(self, push_id: int, engines: Sequence[int]) -> None:
        """Push `push_id` has started and its first bucket is due: the previous push is
        drained and `engines` take part (a direct push: each opened its store, and none is
        evicted from here to the last bucket, so every store written from now on is one its
        engine handed out for this push)."""

    def write(
        self,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        regions: list[torch.Tensor],
    ) -> None:
        """Write bucket g into every region: each live engine's range of its store (direct),
        or the bucket's region of the shared buffer (staged; longer than the bucket). Called
        in bucket order; bucket g is published ready once this returns."""
        if len(regions) > 1:
            if self._pool is None or self._pool_size < len(regions):
                self.close()
                self._pool = ThreadPoolExecutor(len(regions), thread_name_prefix="ipc-write")
                self._pool_size = len(regions)
            for done in [self._pool.submit(pack_bucket, bucket, tensors, r) for r in regions]:
                done.result()
        elif regions:
            pack_bucket(bucket, tensors, regions[0])

    def close(self) -> None:
        """Release what `write` made (a writer used again after this makes it anew)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class PayloadWriter(BucketWriter):
    """Writes bucket g's `rlsync.plan.delta` payload, `encode(g)`, into its region (header, then
    body); the payload carries its own checks."""

    def __init__(self, encode: base.Encode):
        super().__init__()
        self.encode = encode

    def write(
        self,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        regions: list[torch.Tensor],
    ) -> None:
        for region in regions:
            self.encode(g).write_into(region)


class IpcSender:
    """Writer side of the ipc protocol over a 1-D uint8 data buffer; the buffer kinds
    (`shm.ShmSender`, `cuda_ipc.CudaIpcSender`) own the buffer and add descriptor fields.
    `writer` writes the buckets' bytes (default: packed from the trainer's tensors)."""

    kind = "shm"

    def __init__(
        self,
        data: torch.Tensor,
        control: Control,
        writer: BucketWriter | None = None,
    ):
        self.data, self.control = data, control
        self.writer = writer or BucketWriter()
        self._last: tuple[int, int, set[int]] | None = None  # push id, buckets, live engines

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
            num_slots=1,
            slot_bytes=0,
            engine_index=engine_index,
            **self._descriptor_fields(engine_index),
        )

    def _descriptor_fields(self, engine_index: int) -> dict:
        return {}

    def fits(self, plan: BucketPlan) -> bool:
        """Whether `plan` can be pushed through this buffer."""
        try:
            layout(plan, self.data.numel())
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
        writer: BucketWriter | None = None,
    ) -> TransferStats:
        """Write bucket after bucket into its region, publishing each as ready.

        `readers` (engine indices, default: all) take part; one that makes no progress for
        `timeout_s` is evicted and listed in `timed_out_engines` while the others go on. With
        `wait`, return once every live engine consumed the whole push; else the next push
        waits for that first (engines stuck there are evicted and reported in this push's
        stats). `push_id` must grow from push to push. `writer` writes this push's buckets
        instead of the buffer's own (delta payloads: `PayloadWriter`).
        """
        t0 = time.perf_counter()
        writer = writer or self.writer
        offsets = layout(plan, self.data.numel())
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        live = self._begin(push_id, readers, stats, timeout_s)
        self.control.set_ready(seq(push_id, 0))
        if not plan.buckets:
            return stats
        try:
            writer.begin(push_id, sorted(live))
            for g, bucket in enumerate(plan.buckets):
                region = self.data[offsets[g] : offsets[g] + region_bytes(bucket.nbytes)]
                self._write(writer, g, bucket, tensors, [region], stats)
                if verify:
                    integrity.seal(g, region, bucket.nbytes)
                self._publish(push_id, g)
            self._last = (push_id, len(plan.buckets), live)
            if wait:
                last = seq(push_id, len(plan.buckets))
                await_engines(self.control, live, last, push_id, stats, timeout_s)
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
        consumes for `timeout_s`, or declines, is evicted and reported, the others go on.
        The push starts (ready = seq(p, 0)) once every engine opened or was evicted, so
        nobody is evicted between the first bucket and the last (what lets other writers,
        `BucketWriter.begin`, trust the engines they are given). Returns once every live
        engine has seen the whole push.
        """
        t0 = time.perf_counter()
        if verify and self.data.numel() < TRAILER_BYTES * len(plan.buckets):
            raise TransportError(f"ipc: no room for {len(plan.buckets)} trailers")
        stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
        live = self._begin(push_id, sorted(stores), stats, timeout_s)
        try:
            opened = self.control.opened
            await_engines(self.control, live, seq(push_id, 0), push_id, stats, timeout_s, opened)
            fence()
            self.control.set_ready(seq(push_id, 0))
            self.writer.begin(push_id, sorted(live))
            for g, bucket in enumerate(plan.buckets):
                at = slice(bucket.store_offset, bucket.store_offset + bucket.nbytes)
                regions = [stores[e][at] for e in sorted(live)]
                self._write(self.writer, g, bucket, tensors, regions, stats)
                if verify and regions:
                    self._trailer(g).copy_(fingerprint(regions[0]).reshape(1).view(torch.uint8))
                self._publish(push_id, g)
            self._last = (push_id, len(plan.buckets), live)
            last = seq(push_id, len(plan.buckets))
            await_engines(self.control, live, last, push_id, stats, timeout_s)
        except BaseException:
            self.control.set_aborted(push_id)
            raise
        stats.seconds = time.perf_counter() - t0
        return stats

    def _write(
        self,
        writer: BucketWriter,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        regions: list[torch.Tensor],
        stats: TransferStats,
    ) -> None:
        t0 = time.perf_counter()
        writer.write(g, bucket, tensors, regions)
        for region in regions:
            if region.is_cuda:  # the bytes must be in device memory before we say "ready"
                torch.cuda.current_stream(region.device).synchronize()
        stats.add("pack", time.perf_counter() - t0)

    def _publish(self, push_id: int, g: int) -> None:
        fence()  # the bucket's bytes before the word that says they are there
        self.control.set_ready(seq(push_id, g + 1))

    def _trailer(self, g: int) -> torch.Tensor:
        return self.data[TRAILER_BYTES * g : TRAILER_BYTES * (g + 1)]

    def _begin(
        self, push_id: int, readers: Sequence[int] | None, stats: TransferStats, timeout_s: float
    ) -> set[int]:
        """Drain the previous push, then name the engines of this one (the caller starts it)."""
        if not 0 <= push_id <= MAX_PUSH_ID:
            raise ValueError(f"push_id {push_id} out of range")
        live = set(range(self.control.num_engines) if readers is None else readers)
        if any(not 0 <= e < self.control.num_engines for e in live):
            raise ValueError(f"readers {sorted(live)} not in [0, {self.control.num_engines})")
        if self._last is not None:
            prev, count, last_live = self._last
            if push_id <= prev:
                raise ValueError(f"push_id {push_id} must be greater than the previous {prev}")
            await_engines(self.control, last_live, seq(prev, count), prev, stats, timeout_s)
        name_members(self.control, push_id, live)
        return live

    def close(self) -> None:
        """Release the data buffer and unlink the control segment."""
        self.writer.close()
        self.data = torch.empty(0, dtype=torch.uint8)
        self._close_data()
        self.control.close()

    def _close_data(self) -> None:
        pass


# ---------------------------------------------------------------- buffer kinds


def make_sender(
    plan: BucketPlan | None = None,
    *,
    num_engines: int,
    device: torch.device | str | None = None,
    capacity_bytes: int | None = None,
    writer: BucketWriter | None = None,
) -> IpcSender:
    """A CUDA buffer when `device` is a GPU, else a shared-memory one."""
    sizes = dict(num_engines=num_engines, capacity_bytes=capacity_bytes, writer=writer)
    if device is not None and torch.device(device).type == "cuda":
        from rlsync.transports.cuda_ipc import CudaIpcSender

        return CudaIpcSender(plan, device=device, **sizes)
    from rlsync.transports.shm import ShmSender

    return ShmSender(plan, **sizes)


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
    only when a plan no longer fits). The push id grows every push.

    `make_writer` (a public hook): makes the `BucketWriter` of each buffer this sender makes,
    i.e. who writes the buckets' bytes (default: this process packs them; a sharded trainer
    passes one that lets every rank write its rows, `rlsync.transports.sharded.ipc`)."""

    kind = "ipc"

    def __init__(self, *args: Any, make_writer: Callable[[], BucketWriter] = BucketWriter):
        super().__init__(*args)
        self.make_writer = make_writer
        self.buffer: IpcSender | None = None
        self.direct: IpcSender | None = None
        self.push_id = 0
        self.one_copy = False
        """This push writes the engines' stores directly (its plan follows their layout)."""
        self.targets: dict[str, StoreRef] = {}
        """engine -> the store it named for this push (UpdateAccepted.store)."""
        self.stores = MappedStores()
        remove_orphan_segments()  # what a SIGKILLed pusher left in /dev/shm

    def prepare(
        self, plan: BucketPlan, tensors: base.Tensors, version: int, kind: base.PushKind
    ) -> None:
        self.push_id += 1
        self.targets.clear()
        self.stores.next_push()
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
                    writer=self.make_writer(),
                )
        elif self.buffer is None or not self.buffer.fits(plan):
            self._close_buffer("buffer")
            self.buffer = make_sender(
                plan,
                num_engines=len(self.engines.names),
                device=self.device,
                writer=self.make_writer(),
            )

    @property
    def current(self) -> IpcSender:
        """The buffer this push goes through (after `prepare`)."""
        buffer = self.direct if self.one_copy else self.buffer
        assert buffer is not None, "prepare first"
        return buffer

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromIPC:
        return UpdateWeightsFromIPC(
            buffer=self.current.descriptor(self.engines.index(engine)),
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
            stores = {self.engines.index(n): self.stores.flat(self.targets[n]) for n in accepted}
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
            self.stores.unmap_stale()

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
            writer=PayloadWriter(encode),
        )

    def close(self) -> None:
        self._close_buffer("buffer")
        self._close_buffer("direct")
        self.stores.close()


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
        # the pusher may wait timeout_s for other engines' accepts before it starts the push
        bounds = dict(verify=msg.verify, timeout_s=msg.timeout_s, start_timeout_s=2 * msg.timeout_s)
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
        """A delta update: each region holds a payload of `rlsync.plan.delta`, not a packed bucket."""
        self.active = True
        try:
            self._reader(msg.buffer).receive(
                delta.wire_plan(plan),
                msg.push_id,
                lambda g, _, region: delta.apply_region(g, plan.buckets[g], region, writer),
                timeout_s=msg.timeout_s,
                cancel=writer.cancel,
                start_timeout_s=2 * msg.timeout_s,
            )
        finally:
            self.active = False

    def failed(self, msg: UpdateWeightsFromIPC) -> None:
        """Say at once that this engine is out of the push (declined[e] = push_id + 1), so the
        sender leaves it behind now instead of waiting `timeout_s` for it and stalling every
        other engine: e.g. an in_place update whose wait for idle ran out before it opened its
        store. Its own mapping of the control segment (the update may have failed before
        anything was attached, and a worker still stopping may hold the reader's). A sender
        that is gone needs no word: then nothing is written."""
        buffer = msg.buffer
        try:
            control = Control.open(buffer)
        except (TransportError, OSError):
            return
        try:
            control.set_declined(buffer.engine_index, msg.push_id)
        finally:
            control.close()

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
