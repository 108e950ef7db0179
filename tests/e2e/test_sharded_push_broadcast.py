"""Sharded (FSDP2) trainers push over broadcast: every rank broadcasts its own rows.

Real pieces: trainer ranks are spawned processes in a gloo group with the policy under
`fully_shard`; engines are `infer_side.server` processes; the weights group is one gloo
broadcast group per trainer rank, each with every engine (`broadcast_rows`). Dims are
uneven for 2 and 4 ranks (vocab 99, intermediate 70) and embeddings are tied. After a push
every engine tensor must equal the full model's, bit for bit, in the engine's dtype.
"""

from __future__ import annotations

import pytest

from infer_side.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.shard_procs import host_store, run_ranks
from tests.e2e.sync_helpers import trainer_weights
from tests.e2e.test_sharded_push import UNEVEN, expected_fingerprints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), tie=True, seed=5, **UNEVEN)


@pytest.fixture(scope="module")
def fp32_engine(ckpt):
    client = launch_engine(ckpt, kv_tokens=512, threads=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def bf16_engine(ckpt):
    client = launch_engine(ckpt, kv_tokens=512, threads=1, dtype="bfloat16")
    yield client
    client.close()


def sync(**kw) -> SyncConfig:
    return SyncConfig(
        transport="broadcast",
        bucket_mb=kw.pop("bucket_mb", 0.02),
        timeout_s=kw.pop("timeout_s", 30.0),
        **kw,
    )


def push(engines, ckpt, tmp_path, world_size, versions, **kw):
    results = run_ranks(
        world_size,
        host_store(),
        ckpt,
        {n: e.endpoint for n, e in engines.items()},
        sync(**kw),
        tmp_path,
        versions=versions,
    )
    for r, res in results.items():
        assert res is not None and "error" not in res, (r, res)
    return results


@pytest.mark.parametrize(
    "world_size, one_copy, load_mode",
    [(2, True, "in_place"), (4, True, "shadow"), (2, False, "shadow")],
    ids=["2-in-store", "4-in-store-shadow", "2-staged"],
)
def test_sharded_broadcast_is_bit_exact_fp32(
    fp32_engine, ckpt, tmp_path, world_size, one_copy, load_mode
):
    first = fp32_engine.info().weight_version + 1
    versions = (first, first + 1)
    results = push(
        {"engine0": fp32_engine},
        ckpt,
        tmp_path,
        world_size,
        versions,
        one_copy=one_copy,
        load_mode=load_mode,
    )
    for report in results[0]["pushes"]:
        assert report["failed"] == [] and report["engines"]["engine0"]["ok"], report
    assert fp32_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, versions[-1], fp32_engine
    )
    assert fp32_engine.info().weight_version == versions[-1]
    total = sum(t.numel() * 4 for t in trainer_weights(ckpt, first).values())
    for r in range(1, world_size):
        for out in results[r]["pushes"]:
            assert 0 < out["bytes_written"] < total and out["errors"] == [], out
