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
