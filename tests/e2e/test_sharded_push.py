"""Sharded (FSDP2) trainers push to real engines: every rank moves only its own rows.

Real pieces throughout: trainer ranks are spawned processes in a gloo group with the policy
under `fully_shard`, engines are `infer_side.process.server` processes. Over ipc the bytes go
through shared memory: straight into the engines' own stores (their published layout, the
default), or through rank 0's staging buffer (`one_copy=False`, the path of engines without
a layout). Over broadcast every rank broadcasts its rows over a gloo group of its own with
every engine (`broadcast_rows`), received in place in the store or staged. The checkpoint
has tied embeddings and dims that 2 and 4 ranks do not split evenly (vocab 99, intermediate
70), so shards are uneven and some ranks hold fewer rows. After a push every engine tensor
must equal the full model's, bit for bit, in the engine's dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.plan.buckets import dtype_from_name, tensor_fingerprint
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.shard_procs import host_store, run_ranks
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights

UNEVEN = dict(vocab_size=99, intermediate_size=70)
TRANSPORTS = ["ipc", "broadcast"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), tie=True, seed=3, **UNEVEN)


def _engine(ckpt, **kw):
    client = launch_engine(ckpt, kv_tokens=512, threads=1, **kw)
    yield client
    client.close()


@pytest.fixture(scope="module")
def fp32_engine(ckpt):
    yield from _engine(ckpt)


@pytest.fixture(scope="module")
def fp32_peer(ckpt):
    yield from _engine(ckpt)


@pytest.fixture(scope="module")
def bf16_engine(ckpt):
    yield from _engine(ckpt, dtype="bfloat16")


def sync(transport: str, **kw) -> SyncConfig:
    return SyncConfig(
        transport=transport,
        bucket_mb=kw.pop("bucket_mb", 0.02),
        timeout_s=kw.pop("timeout_s", 30.0),
        **kw,
    )


def expected_fingerprints(ckpt: Path, version: int, engine) -> dict[str, int]:
    dtypes = {s.name: dtype_from_name(s.dtype) for s in engine.weight_specs().specs}
    return {
        n: tensor_fingerprint(t.to(dtypes[n]))
        for n, t in trainer_weights(ckpt, version).items()
        if n in dtypes
    }


def push(engines, ckpt, tmp_path, world_size, versions, transport, method="shards", **kw):
    """Every rank pushes `versions` to `engines` (name -> client); rank -> its result."""
    results = run_ranks(
        world_size,
        host_store(),
        ckpt,
        {n: e.endpoint for n, e in engines.items()},
        sync(transport, **kw),
        tmp_path,
        method=method,
        versions=versions,
    )
    for r, res in results.items():
        assert res is not None and "error" not in res, (r, res)
    return results


@pytest.mark.parametrize(
    "transport, world_size, one_copy, load_mode",
    [
        ("ipc", 2, True, "in_place"),
        ("ipc", 4, True, "in_place"),
        ("ipc", 2, False, "in_place"),
        ("broadcast", 2, True, "in_place"),
        ("broadcast", 4, True, "shadow"),
        ("broadcast", 2, False, "shadow"),
    ],
    ids=[
        "ipc-2-direct",
        "ipc-4-direct",
        "ipc-2-staged",
        "bc-2-in-store",
        "bc-4-shadow",
        "bc-2-staged",
    ],
)
def test_sharded_push_is_bit_exact_fp32(
    fp32_engine, ckpt, tmp_path, transport, world_size, one_copy, load_mode
):
    first = fp32_engine.info().weight_version + 1
    versions = (first, first + 1)  # the second push reuses what the first set up
    results = push(
        {"engine0": fp32_engine},
        ckpt,
        tmp_path,
        world_size,
        versions,
        transport,
        one_copy=one_copy,
        load_mode=load_mode,
    )
    for report in results[0]["pushes"]:
        assert report["failed"] == [] and report["engines"]["engine0"]["ok"], report
    assert fp32_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, versions[-1], fp32_engine
    )
    assert fp32_engine.info().weight_version == versions[-1]
    # every rank moved its own rows, none of them everything
    total = sum(t.numel() * 4 for t in trainer_weights(ckpt, first).values())
    for r in range(1, world_size):
        for out in results[r]["pushes"]:
            assert 0 < out["bytes_written"] < total and out["errors"] == [], out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sharded_push_casts_on_write_to_a_bf16_engine(bf16_engine, ckpt, tmp_path, transport):
    version = bf16_engine.info().weight_version + 1
    results = push({"engine0": bf16_engine}, ckpt, tmp_path, 4, (version,), transport, verify=True)
    assert results[0]["pushes"][0]["failed"] == []
    assert bf16_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, version, bf16_engine
    )
    outs = bf16_engine.generate(PROMPTS, greedy(4))
    assert {o.weight_version for o in outs} == {version}


def test_gather_baseline_is_bit_exact(fp32_engine, ckpt, tmp_path):
    version = fp32_engine.info().weight_version + 1
    results = push({"engine0": fp32_engine}, ckpt, tmp_path, 2, (version,), "ipc", "gather")
    assert results[0]["pushes"][0]["failed"] == []
    assert results[1]["pushes"][0]["method"] == "gather"
    assert fp32_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, version, fp32_engine
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_rank_reaches_every_engine_and_the_commit_is_atomic(
    fp32_engine, fp32_peer, ckpt, tmp_path, transport
):
    engines = {"engine0": fp32_engine, "engine1": fp32_peer}
    version = max(e.info().weight_version for e in engines.values()) + 1
    results = push(
        engines, ckpt, tmp_path, 2, (version,), transport, load_mode="shadow", commit="atomic"
    )
    report = results[0]["pushes"][0]
    assert report["failed"] == [] and report["commit"] == "atomic", report
    assert results[1]["pushes"][0]["bytes_written"] > 0
    for engine in engines.values():
        assert engine.fingerprints().fingerprints == expected_fingerprints(ckpt, version, engine)
        assert engine.info().weight_version == version


def kill_rank1(engine, ckpt, tmp_path, version, load_mode, transport):
    """Push from 2 ranks whose rank 1 dies right after reporting its rows of bucket 0."""
    return run_ranks(
        2,
        host_store(),
        ckpt,
        {"engine0": engine.endpoint},
        sync(transport, load_mode=load_mode, timeout_s=4.0, bucket_mb=0.005),
        tmp_path,
        versions=(version,),
        kill=(1, 0),
    )


def check_named(results) -> None:
    assert results[1] is None  # it died before writing its result
    out = results[0]["pushes"][0]
    assert "push_error" in out, out
    assert "trainer rank 1" in out["push_error"] and "bucket 1" in out["push_error"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_rank_killed_mid_push_leaves_shadow_serving_the_old_version(
    fp32_engine, ckpt, tmp_path, transport
):
    before = fp32_engine.fingerprints().fingerprints
    old = fp32_engine.info().weight_version
    check_named(kill_rank1(fp32_engine, ckpt, tmp_path, old + 1, "shadow", transport))
    # shadow: the half-written copy is dropped; the old version serves, byte for byte
    assert fp32_engine.fingerprints().fingerprints == before
    assert fp32_engine.info().weight_version == old
    outs = fp32_engine.generate(PROMPTS, greedy(4))
    assert all(not o.error for o in outs) and {o.weight_version for o in outs} == {old}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_rank_killed_mid_push_in_place_refuses_until_repaired(
    fp32_engine, ckpt, tmp_path, transport
):
    old = fp32_engine.info().weight_version
    check_named(kill_rank1(fp32_engine, ckpt, tmp_path / "killed", old + 1, "in_place", transport))
    (out,) = fp32_engine.generate(PROMPTS[:1], greedy(4))
    assert "weights incomplete" in out.error
    # the next push from a full set of ranks repairs it
    push({"engine0": fp32_engine}, ckpt, tmp_path / "again", 2, (old + 2,), transport)
    assert fp32_engine.fingerprints().fingerprints == expected_fingerprints(
        ckpt, old + 2, fp32_engine
    )
    outs = fp32_engine.generate(PROMPTS, greedy(4))
    assert all(not o.error for o in outs) and {o.weight_version for o in outs} == {old + 2}
