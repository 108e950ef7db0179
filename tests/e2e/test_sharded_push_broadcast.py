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
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from tests.e2e.test_sharded_push import UNEVEN, check_named, expected_fingerprints


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), tie=True, seed=5, **UNEVEN)


@pytest.fixture(scope="module")
def fp32_engine(ckpt):
    client = launch_engine(ckpt, kv_tokens=512, threads=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def fp32_peer(ckpt):
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


def test_sharded_broadcast_casts_to_a_bf16_engine_with_verify(bf16_engine, ckpt, tmp_path):
    version = bf16_engine.info().weight_version + 1
    results = push({"engine0": bf16_engine}, ckpt, tmp_path, 4, (version,), verify=True)
    assert results[0]["pushes"][0]["failed"] == []
    assert bf16_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, version, bf16_engine
    )
    outs = bf16_engine.generate(PROMPTS, greedy(4))
    assert {o.weight_version for o in outs} == {version}


def test_every_rank_reaches_every_engine_and_the_commit_is_atomic(
    fp32_engine, fp32_peer, ckpt, tmp_path
):
    engines = {"engine0": fp32_engine, "engine1": fp32_peer}
    version = max(e.info().weight_version for e in engines.values()) + 1
    results = push(engines, ckpt, tmp_path, 2, (version,), load_mode="shadow", commit="atomic")
    report = results[0]["pushes"][0]
    assert report["failed"] == [] and report["commit"] == "atomic", report
    for engine in engines.values():
        assert engine.fingerprints().fingerprints == expected_fingerprints(ckpt, version, engine)
        assert engine.info().weight_version == version


def kill_rank1(engine, ckpt, tmp_path, version, load_mode):
    """Push from 2 ranks whose rank 1 dies right after its rows of bucket 0 went out."""
    return run_ranks(
        2,
        host_store(),
        ckpt,
        {"engine0": engine.endpoint},
        sync(load_mode=load_mode, timeout_s=4.0, bucket_mb=0.005),
        tmp_path,
        versions=(version,),
        kill=(1, 0),
    )


def test_a_rank_killed_mid_push_leaves_shadow_serving_the_old_version(fp32_engine, ckpt, tmp_path):
    before = fp32_engine.fingerprints().fingerprints
    old = fp32_engine.info().weight_version
    check_named(kill_rank1(fp32_engine, ckpt, tmp_path, old + 1, "shadow"))
    assert fp32_engine.fingerprints().fingerprints == before
    assert fp32_engine.info().weight_version == old
    outs = fp32_engine.generate(PROMPTS, greedy(4))
    assert all(not o.error for o in outs) and {o.weight_version for o in outs} == {old}


def test_a_rank_killed_mid_push_in_place_refuses_until_repaired(fp32_engine, ckpt, tmp_path):
    old = fp32_engine.info().weight_version
    check_named(kill_rank1(fp32_engine, ckpt, tmp_path / "killed", old + 1, "in_place"))
    (out,) = fp32_engine.generate(PROMPTS[:1], greedy(4))
    assert "weights incomplete" in out.error
    push({"engine0": fp32_engine}, ckpt, tmp_path / "again", 2, (old + 2,))
    assert fp32_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, old + 2, fp32_engine
    )
    outs = fp32_engine.generate(PROMPTS, greedy(4))
    assert all(not o.error for o in outs) and {o.weight_version for o in outs} == {old + 2}
