"""The ipc transport for sharded trainers: every rank writes its own rows, rank 0 coordinates.

Two paths, chosen by the plan as for one rank (`rlsync.transports.ipc`, whose protocol rank
0 runs unchanged, with its bucket writes given to `sharded.buffer.RankRows` through the ipc
sender's public `make_writer` hook):
- in the engines' stores (the plan follows their published layout, one copy per byte):
  rank 0 announces, waits until every engine has opened its target store (paused for
  in_place, or its shadow) or is left behind, then tells the other ranks which store each
  engine named; each rank maps them and copies its rows of each tensor straight to their
  home, cast to the engine's dtype, into the store of each engine that is still in the
  push (checked in the control segment before every bucket: never one rank 0 evicted, one
  that declined, or one not named in the push, e.g. an in_place engine whose wait for idle
  ran out: it keeps generating on its old bytes, never on a mix);
- staged (vLLM, or engines without an exposed layout): rank 0's shared buffer of buckets,
  which every rank maps; each rank writes its rows into the bucket slots and the engines
  copy from there, as for a one-rank push.
Either way rank 0 marks bucket g ready for the engines only once every rank has reported
its rows of g written (`rlsync.transports.sharded.channel`); a rank that does not report in `timeout_s` aborts
the push for every engine and is named. Rank 0 evicts engines only before the other ranks
hear its word and after they all reported their last bucket, so no rank writes a store
after rank 0 gave up on its engine. Only rank 0 talks to the engines; no rank copies another
rank's bytes. CPU shared memory only for now.

The word rank 0 hands the others (`encode_go`) is a msgpack list of protocol frames: the
UpdateWeightsFromIPC the engines got (buffer, plan, push id) and, for a direct push, one
frame per engine: its UpdateAccepted naming its store, or nil for an engine not in the push.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack
import torch

from rlsync.plan.buckets import in_store
from rlsync.transports import TransportError, ipc
from rlsync.transports.control import Control, Segment, layout, region_bytes
from rlsync.transports.ipc_waits import store_writable
from rlsync.transports.sharded.buffer import RankRows, write_bucket_shards
from rlsync.transports.sharded.channel import ShardChannel
from rlsync.transports.store import MappedStores
from rlsync.wire import codec
from rlsync.wire.protocol import Bucket, BucketPlan, StoreRef, UpdateAccepted, UpdateWeightsFromIPC

MAX_STORES = 4096


def encode_go(msg: UpdateWeightsFromIPC, stores: Sequence[StoreRef | None]) -> bytes:
    """`stores[e]`: the store engine e named for this direct push (None: e is not in it)."""
    frames = [
        codec.encode(msg),
        *(None if s is None else codec.encode(UpdateAccepted(store=s)) for s in stores),
    ]
    return msgpack.packb(frames, use_bin_type=True)


def decode_go(payload: bytes) -> tuple[UpdateWeightsFromIPC, list[StoreRef | None]]:
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
    return msg, [_store(frame) for frame in frames[1:]]


def _store(frame: Any) -> StoreRef | None:
    if frame is None:
        return None
    accepted = codec.decode(frame)
    if not isinstance(accepted, UpdateAccepted) or accepted.store is None:
        raise TransportError("sharded push: a store frame names no store")
    return accepted.store


class ShardIpcSender(ipc.Sender):
    """Rank 0's ipc sender in a sharded push: the ipc protocol of one rank, whose buckets are
    written through `RankRows` (its public `make_writer` hook), so every rank writes its
    own rows."""

    def __init__(self, *args: Any, channel: ShardChannel):
        rows = RankRows(channel)
        super().__init__(*args, make_writer=lambda: rows)
        if self.device.type != "cpu":
            raise TransportError("sharded ipc push: CPU shared memory only (use method gather)")
        self.rows, self.channel, self.push_n = rows, channel, 0

    def send(self, plan: BucketPlan, tensors: Any, accepted: list[str]) -> None:
        """Hand the rows writer the word for the other ranks (the buffer, the plan, and for a
        direct push the store each engine that accepted named), then push as one rank does."""
        stores: list[StoreRef | None] = []
        if self.one_copy:
            stores = [None] * len(self.engines.names)
            for name in accepted:
                stores[self.engines.index(name)] = self.targets.get(name)
        go = UpdateWeightsFromIPC(
            buffer=self.current.descriptor(0), plan=plan, push_id=self.push_id
        )
        self.rows.start(self.push_n, encode_go(go, stores))
        super().send(plan, tensors, accepted)


class ShardWriter:
    """A rank > 0 of a sharded push: maps what rank 0 names (its staging buffer, or the
    engines' stores; kept across pushes) and writes its rows bucket after bucket. A store is
    written only while its engine is still in the push (`ipc_waits.store_writable`, read
    in the control segment before every bucket): an engine rank 0 left behind, or one that
    declined, is never written again in that push."""

    def __init__(self, channel: ShardChannel):
        self.channel = channel
        self.buffer: Segment | None = None
        self.control: Control | None = None
        self.stores = MappedStores()

    def write(self, n: int, tensors: Mapping[str, torch.Tensor], wait_s: float) -> int | None:
        """Write this rank's rows of push n; the bytes written (None: rank 0 sent none)."""
        payload = self.channel.wait_go(n, wait_s)
        if not payload:
            return None
        msg, refs = decode_go(payload)
        assert msg.plan is not None
        self.stores.next_push()
        written = done = 0
        try:
            control = self._open_control(msg)
            targets = self._targets(msg, refs, control)
            for g, bucket in enumerate(msg.plan.buckets):
                if control.aborted() == msg.push_id + 1:
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
        self.stores.unmap_stale()
        return written

    def _targets(
        self, msg: UpdateWeightsFromIPC, refs: list[StoreRef | None], control: Control
    ) -> Callable[[int], list[torch.Tensor]]:
        """g -> the byte regions bucket g goes to (one per live engine store, or one slot)."""
        plan = msg.plan
        assert plan is not None
        if in_store(plan):
            flats = {e: self.stores.flat(ref) for e, ref in enumerate(refs) if ref is not None}
            return lambda g: _live_regions(flats, plan.buckets[g], control, msg.push_id)
        data = self._map_buffer(msg)
        offsets = layout(plan, msg.buffer.nbytes)
        return lambda g: [data[offsets[g] : offsets[g] + region_bytes(plan.buckets[g].nbytes)]]

    def _open_control(self, msg: UpdateWeightsFromIPC) -> Control:
        if self.control is None or self.control.name != msg.buffer.control_name:
            if self.control is not None:
                self.control.close()
            self.control = None
            self.control = Control.open(msg.buffer)
        return self.control

    def _map_buffer(self, msg: UpdateWeightsFromIPC) -> torch.Tensor:
        buf = msg.buffer
        if self.buffer is None or self.buffer.name != buf.name:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = None
            self.buffer = Segment(buf.name, buf.nbytes)
        return self.buffer.tensor()

    def close(self) -> None:
        for part in (self.buffer, self.control):
            if part is not None:
                part.close()
        self.buffer = self.control = None
        self.stores.close()


def _live_regions(
    flats: dict[int, torch.Tensor], bucket: Bucket, control: Control, push_id: int
) -> list[torch.Tensor]:
    """Bucket's range of each store whose engine is still in the push; an engine found out
    is dropped from `flats`, so it stays out for the rest of the push."""
    for engine in [e for e in flats if not store_writable(control, e, push_id)]:
        del flats[engine]
    at = slice(bucket.store_offset, bucket.store_offset + bucket.nbytes)
    return [flat[at] for flat in flats.values()]
