"""Where a sharded trainer rank's bytes go inside a bucket, and rank 0's bucket writer.

A dim-0 shard of a row-major tensor is one contiguous byte range of the tensor's slot in a
bucket (its first row times the row's bytes, for its rows' bytes), whether the bucket is a
slot of a staging buffer or a range of an engine's store. `write_bucket_shards` writes this
rank's rows of every tensor of a bucket there, cast on the write. `RankRows` is rank 0's
bucket writer: its rows, then the wait for every other rank's. Nothing here knows engines
or the RL loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rlsync.plan.buckets import dtype_from_name
from rlsync.transports.ipc import BucketWriter
from rlsync.transports.sharded.channel import ShardChannel
from rlsync.transports.sharded.dim0 import dim0_shard
from rlsync.wire.protocol import Bucket


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


class RankRows(BucketWriter):
    """Rank 0's bucket writes in a sharded push (`ipc.BucketWriter`, the ipc sender's hook for
    who writes each bucket): rank 0 writes its own rows of bucket g into every region (each
    live engine's store range, or the staging buffer's slot), then waits until every other
    rank reported its rows of g written; only then does the ipc sender publish g as ready.

    `begin` publishes the word that tells the other ranks where to write (`start` hands it
    over before the push): by then the previous push is drained and, for a direct push,
    every engine still in it opened its store (the ranks check each engine again before
    every bucket, `ipc_waits.store_writable`)."""

    def __init__(self, channel: ShardChannel):
        super().__init__()
        self.channel = channel
        self.push_n, self.go = 0, b""

    def start(self, push_n: int, go: bytes) -> None:
        self.push_n, self.go = push_n, go

    def begin(self, push_id: int, engines: Sequence[int]) -> None:
        self.channel.publish(self.push_n, self.go)

    def write(
        self,
        g: int,
        bucket: Bucket,
        tensors: Mapping[str, torch.Tensor],
        regions: list[torch.Tensor],
    ) -> None:
        for region in regions:
            write_bucket_shards(region, bucket, tensors, 0)
        self.channel.wait_wrote(self.push_n, g, self.channel.timeout_s)
