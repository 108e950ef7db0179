"""The pieces of a sharded push that need no engine: where a rank's rows land in a bucket,
the word rank 0 hands the other ranks (and what a bad one gets), the per-rank progress keys
(a silent rank is named), and the pusher's refusals. The whole push, with real ranks and
engines, is in tests/e2e/test_sharded_push.py."""

from __future__ import annotations

import msgpack
import pytest
import torch
import torch.distributed as dist

from rlsync.config import SyncConfig
from rlsync.plan.buckets import bucket_views, plan_buckets
from rlsync.transports import TransportError, TransportTimeout
from rlsync.transports.sharded.buffer import write_bucket_shards
from rlsync.transports.sharded.channel import ShardChannel
from rlsync.transports.sharded.ipc import decode_go, encode_go
from rlsync.wire import codec
from rlsync.wire.protocol import GetInfo, IpcBuffer, StoreRef, UpdateAccepted, UpdateWeightsFromIPC
from trainer_side.sync.shard_push import ShardedPusher


def test_plain_tensors_are_written_by_rank_0_alone_and_cast_on_write() -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    plan = plan_buckets([("a", "bfloat16", (3, 4)), ("b", "float32", (5,))])
    (bucket,) = plan.buckets
    region = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    assert write_bucket_shards(region, bucket, tensors, rank=1) == 0
    assert not region.any()
    assert write_bucket_shards(region, bucket, tensors, rank=0) == 3 * 4 * 2 + 5 * 4
    views = dict(bucket_views(bucket, region))
    assert torch.equal(views["a"], tensors["a"].to(torch.bfloat16))
    assert torch.equal(views["b"], tensors["b"])


def test_go_round_trips_and_bad_words_are_refused_by_name() -> None:
    plan = plan_buckets([("a", "float32", (2, 2))])
    msg = UpdateWeightsFromIPC(buffer=IpcBuffer(name="x", control_name="y"), plan=plan, push_id=3)
    store = StoreRef(name="rlsync-1-ab-store", nbytes=64)
    got, stores = decode_go(encode_go(msg, [store]))
    assert got.push_id == 3 and got.plan == plan and stores == [store]
    with pytest.raises(TransportError, match="not msgpack"):
        decode_go(b"\xc1")
    with pytest.raises(TransportError, match="not a list of frames"):
        decode_go(msgpack.packb({"a": 1}))
    with pytest.raises(TransportError, match="sent GetInfo, not a plan"):
        decode_go(msgpack.packb([codec.encode(GetInfo())]))
    with pytest.raises(TransportError, match="names no store"):
        decode_go(msgpack.packb([codec.encode(msg), codec.encode(UpdateAccepted())]))


def test_rank_0_names_the_rank_that_did_not_write_a_bucket() -> None:
    store = dist.HashStore()
    rank0, rank1 = (ShardChannel(store, r, 3, timeout_s=1.0) for r in (0, 1))
    rank2 = ShardChannel(store, 2, 3, timeout_s=1.0)
    rank1.wrote(7, 0)
    rank2.wrote(7, 0)
    rank0.wait_wrote(7, 0, timeout_s=0.5)  # both in: returns
    rank1.wrote(7, 1)
    with pytest.raises(
        TransportTimeout, match="trainer rank 2 did not write its shard of bucket 1"
    ):
        rank0.wait_wrote(7, 1, timeout_s=0.2)
    rank0.publish(7, b"")
    assert rank0.published(7) and rank1.wait_go(7, 0.2) == b""
    rank0.forget(7, 2)
    assert not rank0.published(7)


def test_sharded_pusher_refuses_what_it_cannot_do(tmp_path) -> None:
    store = dist.HashStore()
    with pytest.raises(
        ValueError, match="method 'shards' needs transport .ipc. or .broadcast., not .disk."
    ):
        ShardedPusher(
            SyncConfig(transport="disk"), None, tmp_path, store=store, rank=1, world_size=2
        )
    with pytest.raises(ValueError, match="rank 0 needs the engines' endpoints"):
        ShardedPusher(SyncConfig(), None, tmp_path, store=store, rank=0, world_size=2)
    with pytest.raises(ValueError, match="method: 'scatter'"):
        ShardedPusher(
            SyncConfig(), None, tmp_path, store=store, rank=1, world_size=2, method="scatter"
        )
