"""Where a sharded trainer rank's bytes go inside a bucket, and rank 0's staging buffer.

A dim-0 shard of a row-major tensor is one contiguous byte range of the tensor's slot in a
bucket (its first row times the row's bytes, for its rows' bytes), whether the bucket is a
slot of a staging buffer or a range of an engine's store. `write_bucket_shards` writes this
rank's rows of every tensor of a bucket there, cast on the write. `ShardShmBuffer` is the
staging buffer rank 0 owns and every rank maps. Nothing here knows engines or the RL loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from rlsync.buckets import dtype_from_name
from rlsync.protocol import Bucket, BucketPlan
from rlsync.transports import TransferStats, integrity
from rlsync.transports.control import region_bytes
from rlsync.transports.shm import ShmSender
from trainer_side.fsdp import dim0_shard
from trainer_side.shard_channel import ShardChannel


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


class _RankCoordination:
    """What rank 0's two buffers share: the push they serve, the word that tells the other
    ranks where to write (published when the first bucket is due: by then the previous push
    is drained and, for a direct push, every engine has opened its store), and the wait for
    their rows of each bucket."""

    channel: ShardChannel
    push_n: int = 0
    go: bytes = b""

    def start(self, push_n: int, go: bytes) -> None:
        self.push_n, self.go = push_n, go

    def _rows_of_others(self, g: int) -> None:
        if g == 0:
            self.channel.publish(self.push_n, self.go)

    def _wait_others(self, g: int) -> None:
        self.channel.wait_wrote(self.push_n, g, self.channel.timeout_s)


class ShardShmBuffer(_RankCoordination, ShmSender):
    """Rank 0's staging buffer of a sharded push (engines without a layout): filling bucket
    g writes rank 0's rows into its slot, then waits for every other rank's rows of g (the
    ipc slot protocol does the rest)."""

    def __init__(self, plan: BucketPlan, *, num_engines: int, channel: ShardChannel):
        super().__init__(plan, num_engines=num_engines)
        self.channel = channel

    def _fill(
        self,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        offset: int,
        verify: bool,
        stats: TransferStats,
    ) -> None:
        self._rows_of_others(g)
        t0 = time.perf_counter()
        region = self.data[offset : offset + region_bytes(bucket.nbytes)]
        write_bucket_shards(region, bucket, tensors, 0)
        t1 = time.perf_counter()
        stats.add("pack", t1 - t0)
        self._wait_others(g)
        stats.add("ranks", time.perf_counter() - t1)
        if verify:  # reads the bucket in place to checksum it; nothing is copied
            integrity.seal(g, region, bucket.nbytes)


class ShardDirectBuffer(_RankCoordination, ShmSender):
    """Rank 0's trailer buffer of a direct sharded push (engines publish their layout).
    `IpcSender.push_direct` runs the protocol (engines open their stores, buckets become
    ready in order, any failure aborts); writing bucket g here writes rank 0's rows into
    every engine's region of g, then waits for every other rank's rows of g."""

    def __init__(self, *, num_engines: int, capacity_bytes: int, channel: ShardChannel):
        super().__init__(num_engines=num_engines, capacity_bytes=capacity_bytes)
        self.channel, self._g = channel, 0

    def start(self, push_n: int, go: bytes) -> None:
        super().start(push_n, go)
        self._g = 0

    def _write(
        self, bucket: Bucket, tensors: Mapping[str, torch.Tensor], regions: list[torch.Tensor]
    ) -> None:
        """Called once per bucket, in order (`push_direct`)."""
        self._rows_of_others(self._g)
        for region in regions:
            write_bucket_shards(region, bucket, tensors, 0)
        self._wait_others(self._g)
        self._g += 1
