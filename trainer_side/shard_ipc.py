"""The ipc transport for sharded trainers: every rank writes its own rows, rank 0 coordinates.

Two paths, chosen by the plan as for one rank (`rlsync.transports.ipc`, whose protocol rank
0 runs unchanged):
- in the engines' stores (the plan follows their published layout, one copy per byte):
  rank 0 announces, waits until every engine has opened its target store (paused for
  in_place, or its shadow), then tells the other ranks which stores to write; each rank
  maps every engine's store and copies its rows of each tensor straight to their home,
  cast to the engine's dtype;
- staged (vLLM, or engines without an exposed layout): rank 0's shared buffer of buckets,
  which every rank maps; each rank writes its rows into the bucket slots and the engines
  copy from there, as for a one-rank push.
Either way rank 0 marks bucket g ready for the engines only once every rank has reported
its rows of g written (`shard_channel`); a rank that does not report in `timeout_s` aborts
the push for every engine and is named. Only rank 0 talks to the engines; no rank copies
another rank's bytes. CPU shared memory only for now.

The word rank 0 hands the others (`encode_go`) is a msgpack list of protocol frames: the
UpdateWeightsFromIPC the engines got (buffer, plan, push id) and, for a direct push, each
engine's UpdateAccepted naming its store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import torch

from rlsync import codec
from rlsync.buckets import in_store
from rlsync.protocol import BucketPlan, StoreRef, UpdateAccepted, UpdateWeightsFromIPC
from rlsync.transports import TransportError, ipc
from rlsync.transports.base import PushKind
from rlsync.transports.control import Control, Segment, layout, region_bytes
from rlsync.transports.integrity import TRAILER_BYTES
from rlsync.transports.store import MappedStore
from trainer_side.shard_buffer import ShardDirectBuffer, ShardShmBuffer, write_bucket_shards
from trainer_side.shard_channel import ShardChannel

MAX_STORES = 4096


def encode_go(msg: UpdateWeightsFromIPC, stores: list[StoreRef]) -> bytes:
    frames = [codec.encode(msg), *(codec.encode(UpdateAccepted(store=s)) for s in stores)]
    return msgpack.packb(frames, use_bin_type=True)


def decode_go(payload: bytes) -> tuple[UpdateWeightsFromIPC, list[StoreRef]]:
    """Rank 0's word on a push, checked frame by frame; raises TransportError (or the
    codec's ProtocolError naming the message and field of a bad frame)."""
    try:
        frames = msgpack.unpackb(payload, raw=False, max_bin_len=codec.MAX_FRAME_BYTES)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise TransportError(f"sharded push: rank 0's word is not msgpack ({exc})") from None
    if not isinstance(frames, list) or not 1 <= len(frames) <= MAX_STORES + 1:
        raise TransportError("sharded push: rank 0's word is not a list of frames")
    msg = codec.decode(frames[0])
    if not isinstance(msg, UpdateWeightsFromIPC) or msg.plan is None:
        raise TransportError(f"sharded push: rank 0 sent {type(msg).__name__}, not a plan")
    stores = []
    for frame in frames[1:]:
        accepted = codec.decode(frame)
        if not isinstance(accepted, UpdateAccepted) or accepted.store is None:
            raise TransportError("sharded push: a store frame names no store")
        stores.append(accepted.store)
    return msg, stores


class ShardIpcSender(ipc.Sender):
    """Rank 0's ipc sender in a sharded push: the ipc protocol of one rank, with buffers whose
    bucket writes let every rank write (`ShardShmBuffer`, `ShardDirectBuffer`)."""

    def __init__(self, *args: Any, channel: ShardChannel):
        super().__init__(*args)
        if self.device.type != "cpu":
            raise TransportError("sharded ipc push: CPU shared memory only (use method gather)")
        self.channel, self.push_n = channel, 0

    def prepare(self, plan: BucketPlan, tensors: Any, version: int, kind: PushKind) -> None:
        """As `ipc.Sender.prepare`, with the sharded buffers."""
        self.push_id += 1
        self.targets.clear()
        self.one_copy = in_store(plan)
        engines = len(self.engines.names)
        if self.one_copy:
            trailers = TRAILER_BYTES * max(len(plan.buckets), 1)
            if (
                not isinstance(self.direct, ShardDirectBuffer)
                or self.direct.data.numel() < trailers
            ):
                self._close_buffer("direct")
                self.direct = ShardDirectBuffer(
                    num_engines=engines, capacity_bytes=trailers, channel=self.channel
                )
        elif not isinstance(self.buffer, ShardShmBuffer) or not self.buffer.fits(plan):
            self._close_buffer("buffer")
            self.buffer = ShardShmBuffer(plan, num_engines=engines, channel=self.channel)

    def send(self, plan: BucketPlan, tensors: Any, accepted: list[str]) -> None:
        """Hand the buffer the word for the other ranks, then push as one rank does."""
        buffer = self.direct if self.one_copy else self.buffer
        assert isinstance(buffer, (ShardDirectBuffer, ShardShmBuffer))
        refs = [self.targets[n] for n in accepted if n in self.targets] if self.one_copy else []
        go = UpdateWeightsFromIPC(buffer=buffer.descriptor(0), plan=plan, push_id=self.push_id)
        buffer.start(self.push_n, encode_go(go, refs))
        super().send(plan, tensors, accepted)


class ShardWriter:
    """A rank > 0 of a sharded push: maps what rank 0 names (its staging buffer, or the
    engines' stores; kept across pushes) and writes its rows bucket after bucket."""

    def __init__(self, channel: ShardChannel):
        self.channel = channel
        self.buffer: Segment | None = None
        self.control: Control | None = None
        self.stores: dict[tuple, tuple[MappedStore, int]] = {}
        self.pushes = 0

    def write(self, n: int, tensors: Mapping[str, torch.Tensor], wait_s: float) -> int | None:
        """Write this rank's rows of push n; the bytes written (None: rank 0 sent none)."""
        payload = self.channel.wait_go(n, wait_s)
        if not payload:
            return None
        msg, refs = decode_go(payload)
        assert msg.plan is not None
        self.pushes += 1
        written = done = 0
        try:
            self._open_control(msg)
            targets = self._targets(msg, refs)
            for g, bucket in enumerate(msg.plan.buckets):
                if self.control is not None and self.control.aborted() == msg.push_id + 1:
                    raise TransportError(f"push {n}: rank 0 aborted it (at bucket {g})")
                for region in targets(g):
                    written += write_bucket_shards(region, bucket, tensors, self.channel.rank)
                self.channel.wrote(n, g)
                done = g + 1
        except Exception as exc:  # rank 0 learns why at once, not after its timeout
            why = f"{type(exc).__name__}: {exc}"
            for g in range(done, len(msg.plan.buckets)):
                self.channel.wrote(n, g, why)
            raise
        self._unmap_stale()
        return written

    def _targets(self, msg: UpdateWeightsFromIPC, refs: list[StoreRef]) -> Any:
        """g -> the byte regions bucket g goes to (one per engine store, or one slot)."""
        plan = msg.plan
        assert plan is not None
        if in_store(plan):
            flats = [self._mapped(ref) for ref in refs]
            return lambda g: [
                f[
                    plan.buckets[g].store_offset : plan.buckets[g].store_offset
                    + plan.buckets[g].nbytes
                ]
                for f in flats
            ]
        buf = msg.buffer
        data = self._map_buffer(msg)
        offsets = layout(plan, buf.slot_bytes, buf.num_slots, buf.nbytes)
        return lambda g: [data[offsets[g] : offsets[g] + region_bytes(plan.buckets[g].nbytes)]]

    def _open_control(self, msg: UpdateWeightsFromIPC) -> None:
        if self.control is None or self.control.name != msg.buffer.control_name:
            if self.control is not None:
                self.control.close()
            self.control = Control.open(msg.buffer)

    def _map_buffer(self, msg: UpdateWeightsFromIPC) -> torch.Tensor:
        buf = msg.buffer
        if self.buffer is None or self.buffer.name != buf.name:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = Segment(buf.name, buf.nbytes)
        return self.buffer.tensor()

    def _mapped(self, ref: StoreRef) -> torch.Tensor:
        key = (ref.kind, ref.name, ref.nbytes)
        mapping = self.stores[key][0] if key in self.stores else MappedStore(ref)
        self.stores[key] = (mapping, self.pushes)
        return mapping.flat

    def _unmap_stale(self) -> None:
        """As the pusher does: a store not written for two pushes was dropped by its engine."""
        for key, (mapping, last) in list(self.stores.items()):
            if last < self.pushes - 2:
                mapping.close()
                del self.stores[key]

    def close(self) -> None:
        for part in (self.buffer, self.control):
            if part is not None:
                part.close()
        self.buffer = self.control = None
        for mapping, _ in self.stores.values():
            mapping.close()
        self.stores.clear()
