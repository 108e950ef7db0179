"""Sharded trainers (FSDP2) push their weights: every rank moves only its own shard's bytes.

Usage (every trainer rank, in lockstep; `store` is the store the ranks met at):
    pusher = ShardedPusher(sync_cfg, endpoints if rank == 0 else None, work_dir,
                           store=store, rank=rank, world_size=ws, method="shards")
    out = pusher.push(fsdp_policy, version)   # rank 0: the PushReport; others: a RankPush
    pusher.close()

Two methods:
- "shards" (ipc, CPU shared memory): rank 0 runs the normal `WeightPusher` (plan, announce,
  collect accepts, commit) with a sender whose buffer every rank maps. A dim-0 shard of a
  row-major tensor is one contiguous byte range of its slot in a bucket (offset + first row
  x row bytes), so each rank writes its rows there itself, cast to the engine's dtype on the
  write. Rank 0 tells the engines bucket g is ready only once every rank reported its rows
  of g written (`shard_channel`); a rank that does not report within `timeout_s` aborts the
  push for every engine, and the error names that rank. No rank holds a tensor it does not
  own, and the bytes of ranks > 0 never pass through rank 0. The engine side is unchanged:
  it reads the same buffer as for a one-rank push (our engine and the vLLM backend alike).
- "gather": what RL frameworks do today and the fallback for other transports: every rank
  all-gathers each parameter (`DTensor.full_tensor()`), rank 0 keeps the full tensors and
  pushes them through the normal `WeightPusher`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from rlsync import codec
from rlsync.buckets import dtype_from_name
from rlsync.config import SyncConfig
from rlsync.protocol import Bucket, BucketPlan, UpdateWeightsFromIPC
from rlsync.transports import TransferStats, TransportError, integrity, ipc
from rlsync.transports.control import Control, Segment, layout, region_bytes
from rlsync.transports.shm import ShmSender
from trainer_side.fsdp import dim0_shard, full_tensors
from trainer_side.push_report import PushReport
from trainer_side.pusher import WeightPusher, WeightsLike, named_tensors
from trainer_side.shard_channel import ShardChannel

PushMethod = Literal["shards", "gather"]
PUSH_METHODS: tuple[str, ...] = ("shards", "gather")


def write_bucket_shards(
    region: torch.Tensor, bucket: Bucket, tensors: Mapping[str, torch.Tensor], rank: int
) -> int:
    """Write this rank's rows of every tensor of `bucket` into its slot of `region` (the
    bucket's bytes), casting to the plan's dtype; returns the bytes written."""
    written = 0
    for spec in bucket.tensors:
        shard = dim0_shard(tensors[spec.name], rank)
        if shard is None or shard.local.numel() == 0:
            continue
        raw = region[spec.offset : spec.offset + spec.nbytes]
        view = raw.view(dtype_from_name(spec.dtype)).view(spec.shape)
        if view.dim():
            view = view[shard.start : shard.start + shard.rows]
        view.copy_(shard.local)
        written += view.numel() * view.element_size()
    return written


class ShardShmBuffer(ShmSender):
    """Rank 0's shared-memory buffer of a sharded push: filling bucket g writes rank 0's rows
    and then waits for every other rank's rows of g (the ipc slot protocol does the rest)."""

    def __init__(self, plan: BucketPlan, *, num_engines: int, channel: ShardChannel):
        super().__init__(plan, num_engines=num_engines)
        self.channel, self.push_n, self.timeout_s = channel, 0, channel.timeout_s

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
        write_bucket_shards(region, bucket, tensors, 0)
        t1 = time.perf_counter()
        stats.add("pack", t1 - t0)
        self.channel.wait_wrote(self.push_n, g, self.timeout_s)
        stats.add("ranks", time.perf_counter() - t1)
        if verify:  # reads the bucket in place to checksum it; nothing is copied
            integrity.seal(g, region, bucket.nbytes)


class ShardIpcSender(ipc.Sender):
    """The ipc sender of rank 0 in a sharded push: the buffer is a `ShardShmBuffer`, and the
    other ranks learn its name, the plan and the push id just before the bytes move."""

    def __init__(self, *args: Any, channel: ShardChannel):
        super().__init__(*args)
        if self.device.type != "cpu":
            raise TransportError("sharded ipc push: CPU shared memory only (use method gather)")
        self.channel, self.push_n = channel, 0

    def prepare(self, plan: BucketPlan, tensors: Any, version: int) -> None:
        if self.buffer is None or not self.buffer.fits(plan):
            if self.buffer is not None:
                self.buffer.close()
                self.buffer = None
            self.buffer = ShardShmBuffer(
                plan, num_engines=len(self.engines.names), channel=self.channel
            )
        self.push_id += 1

    def send(self, plan: BucketPlan, tensors: Any, accepted: list[str]) -> None:
        assert isinstance(self.buffer, ShardShmBuffer)
        self.buffer.push_n = self.push_n
        go = UpdateWeightsFromIPC(buffer=self.buffer.descriptor(0), plan=plan, push_id=self.push_id)
        self.channel.publish(self.push_n, codec.encode(go))
        super().send(plan, tensors, accepted)


@dataclass
class RankPush:
    """What a rank > 0 did in one push."""

    rank: int
    method: str
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: bool = False
    """Rank 0 moved no bytes this push (it failed before the transfer)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardWriter:
    """A rank > 0 of a sharded push: maps rank 0's buffer (kept across pushes, re-mapped when
    it changes) and writes its rows bucket after bucket."""

    def __init__(self, channel: ShardChannel):
        self.channel = channel
        self.segment: Segment | None = None
        self.control: Control | None = None

    def write(self, n: int, tensors: Mapping[str, torch.Tensor], wait_s: float) -> RankPush:
        t0 = time.perf_counter()
        out = RankPush(rank=self.channel.rank, method="shards")
        payload = self.channel.wait_go(n, wait_s)
        if not payload:
            out.skipped = True
            return out
        msg = codec.decode(payload)
        if not isinstance(msg, UpdateWeightsFromIPC) or msg.plan is None:
            raise TransportError(f"push {n}: rank 0 sent {type(msg).__name__}, not a plan")
        data = self._map(msg)
        plan, buf = msg.plan, msg.buffer
        for g, offset in enumerate(layout(plan, buf.slot_bytes, buf.num_slots, buf.nbytes)):
            if self.control is not None and self.control.aborted() == msg.push_id + 1:
                raise TransportError(f"push {n}: rank 0 aborted it (at bucket {g})")
            bucket = plan.buckets[g]
            region = data[offset : offset + region_bytes(bucket.nbytes)]
            out.bytes_written += write_bucket_shards(region, bucket, tensors, self.channel.rank)
            self.channel.wrote(n, g)
        out.seconds = time.perf_counter() - t0
        return out

    def _map(self, msg: UpdateWeightsFromIPC) -> torch.Tensor:
        buf = msg.buffer
        if self.segment is None or self.segment.name != buf.name:
            self.close()
            self.segment = Segment(buf.name, buf.nbytes)
            self.control = Control.open(buf)
        return self.segment.tensor()

    def close(self) -> None:
        for part in (self.segment, self.control):
            if part is not None:
                part.close()
        self.segment = self.control = None


class ShardedPusher:
    """One trainer rank's part in pushing an FSDP2-sharded model (see the module docstring)."""

    def __init__(
        self,
        cfg: SyncConfig,
        endpoints: Mapping[str, str] | None,
        work_dir: str | Path,
        *,
        store: dist.Store,
        rank: int,
        world_size: int,
        method: PushMethod = "shards",
        device: str | torch.device = "cpu",
        connect_timeout_s: float = 60.0,
        auth_keys: str | Path | None = None,
    ):
        if method not in PUSH_METHODS:
            raise ValueError(f"method: {method!r} is not one of {list(PUSH_METHODS)}")
        if method == "shards" and cfg.transport != "ipc":
            raise ValueError(
                f"method 'shards' needs transport 'ipc', not {cfg.transport!r} (use 'gather')"
            )
        self.cfg, self.rank, self.method = cfg, rank, method
        self.channel = ShardChannel(store, rank, world_size, cfg.timeout_s)
        self.pushes = 0
        self.pusher: WeightPusher | None = None
        self.writer: ShardWriter | None = None
        if rank == 0:
            if endpoints is None:
                raise ValueError("rank 0 needs the engines' endpoints")
            sender = None
            if method == "shards":
                sender = lambda *a: ShardIpcSender(*a, channel=self.channel)  # noqa: E731
            self.pusher = WeightPusher(
                cfg,
                endpoints,
                work_dir,
                device=device,
                connect_timeout_s=connect_timeout_s,
                auth_keys=auth_keys,
                sender_class=sender,
            )
        elif method == "shards":
            self.writer = ShardWriter(self.channel)

    def push(self, weights: WeightsLike, version: int) -> PushReport | RankPush:
        """Every rank calls this with its (sharded) model; rank 0 returns the PushReport (and
        raises PushError as `WeightPusher.push` does), the others what they wrote."""
        self.pushes += 1
        tensors = named_tensors(weights)
        if self.method == "gather":
            return self._push_gathered(tensors, version)
        if self.rank != 0:
            assert self.writer is not None
            # rank 0 announces first: its engines may take 2 x timeout_s to accept
            return self.writer.write(self.pushes, tensors, 3 * self.cfg.timeout_s)
        return self._push_rank0(tensors, version)

    def _push_rank0(self, tensors: dict[str, torch.Tensor], version: int) -> PushReport:
        assert self.pusher is not None
        n = self.pushes
        sender = self.pusher.sender
        assert isinstance(sender, ShardIpcSender)
        sender.push_n = n
        if n > 1:
            self.channel.forget(n - 1, len(self.pusher.plan.buckets) if self.pusher.plan else 0)
        try:
            return self.pusher.push(tensors, version)
        finally:
            if not self.channel.published(n):
                self.channel.publish(n, b"")  # the others must not wait for bytes never sent

    def _push_gathered(self, tensors: dict[str, torch.Tensor], version: int) -> Any:
        t0 = time.perf_counter()
        full = dict(full_tensors(tensors.items(), keep=self.rank == 0))
        if self.rank != 0:
            return RankPush(rank=self.rank, method="gather", seconds=time.perf_counter() - t0)
        assert self.pusher is not None
        return self.pusher.push(full, version)

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        if self.writer is not None:
            self.writer.close()
