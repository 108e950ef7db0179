"""Weight sync end to end: a real WeightPusher pushes to real engine processes over every
transport (gloo broadcast group, shared memory, safetensors), and the engines must then hold
the trainer's weights bit for bit and generate exactly what a fresh engine would."""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import in_store, plan_buckets, plan_in_store
from rlsync.transports.control import SHM_DIR
from rlsync.wire.protocol import (
    GetWeightSpecs,
    UpdateDone,
    UpdateWeightsFromIPC,
    WeightFingerprints,
)
from rlsync.wire.rpc import RpcClient
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import (
    PROMPTS,
    fd_count,
    greedy,
    own_shm_segments,
    reference_tokens,
    trainer_weights,
)
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

TRANSPORTS = ["broadcast", "ipc", "disk"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1)


@pytest.fixture(scope="module")
def cfg(ckpt) -> ModelConfig:
    return ModelConfig.from_dir(ckpt)


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = {f"engine{i}": launch_engine(ckpt, kv_tokens=512, threads=1) for i in range(2)}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def versions():
    return itertools.count(1)


def endpoints(engines) -> dict[str, str]:
    return {name: c.endpoint for name, c in engines.items()}


def sync_cfg(transport: str, **kw) -> SyncConfig:
    return SyncConfig(
        transport=transport,
        bucket_mb=kw.pop("bucket_mb", 0.05),
        timeout_s=kw.pop("timeout_s", 20.0),
        **kw,
    )


def push(engines, tmp_path, transport, tensors, version, **kw):
    pusher = WeightPusher(sync_cfg(transport, **kw), endpoints(engines), tmp_path)
    try:
        report = pusher.push(tensors, version)
        return report, pusher.mismatches(tensors)
    finally:
        pusher.close()


PATHS = [(t, True) for t in TRANSPORTS] + [("broadcast", False), ("ipc", False)]
"""(transport, one_copy): in the engines' store layout (ipc writes their stores directly,
broadcast lands in place), and staged through a buffer."""


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
@pytest.mark.parametrize("transport, one_copy", PATHS)
def test_push_is_bit_exact_and_serves_new_weights(
    engines, ckpt, cfg, versions, tmp_path, transport, one_copy, load_mode
):
    version = next(versions)
    tensors = trainer_weights(ckpt, version)
    pusher = WeightPusher(
        sync_cfg(transport, load_mode=load_mode, verify=True, one_copy=one_copy),
        endpoints(engines),
        tmp_path,
    )
    try:
        report = pusher.push(tensors, version)
        mismatches = pusher.mismatches(tensors)
        assert in_store(pusher.plan) == one_copy  # disk moves files, not buckets
    finally:
        pusher.close()
    assert report.failed == [], report.summary()
    assert report.bytes > 0 and report.gbps > 0
    assert mismatches == {name: [] for name in engines}
    want = reference_tokens(cfg, tensors, PROMPTS)
    for client in engines.values():
        outs = client.generate(PROMPTS, greedy())
        assert [o.output_ids for o in outs] == want
        assert {o.weight_version for o in outs} == {version}
        assert client.info().weight_version == version


def test_stale_prefix_cache_is_flushed_by_update(engines, ckpt, cfg, versions, tmp_path):
    client = engines["engine0"]
    prompt = [[7, 8, 9, 10, 11, 12, 13, 14, 15]]
    client.generate(prompt, greedy(4))
    assert client.generate(prompt, greedy(4))[0].cached_tokens > 0  # the cache works
    version = next(versions)
    tensors = trainer_weights(ckpt, version)
    report, _ = push(engines, tmp_path, "ipc", tensors, version)
    assert report.failed == []
    out = client.generate(prompt, greedy(4))[0]
    assert out.cached_tokens == 0  # nothing computed with the old weights is reused
    assert out.output_ids == reference_tokens(cfg, tensors, prompt, 4)[0]


def test_push_without_flush_keeps_prefix_cache(engines, ckpt, versions, tmp_path):
    client = engines["engine1"]
    prompt = [[21, 22, 23, 24, 25, 26, 27, 28]]
    client.generate(prompt, greedy(2))
    version = next(versions)
    report, _ = push(
        engines, tmp_path, "ipc", trainer_weights(ckpt, version), version, flush_cache=False
    )
    assert report.failed == []
    assert client.generate(prompt, greedy(2))[0].cached_tokens > 0


def _bad_plan_message(engine, mutate) -> tuple[UpdateWeightsFromIPC, WeightFingerprints]:
    with RpcClient(engine.endpoint, timeout_s=10) as rpc:
        specs = rpc.call(GetWeightSpecs()).specs
    items = [(s.name, s.dtype, tuple(s.shape)) for s in specs]
    items = mutate(items)
    msg = UpdateWeightsFromIPC(plan=plan_buckets(items, 1 << 20), weight_version=10_000, push_id=1)
    return msg, engine.fingerprints()


@pytest.mark.parametrize(
    "mutate, named",
    [
        (lambda items: items[:-1], "missing"),
        (
            lambda items: items + [("model.layers.9.mlp.up_proj.weight", "float32", (2, 2))],
            "unknown",
        ),
        (
            lambda items: [
                (n, d, (s[0] + 1, *s[1:]) if i == 1 else s) for i, (n, d, s) in enumerate(items)
            ],
            "shape",
        ),
        (
            lambda items: [
                (n, "bfloat16" if i == 2 else d, s) for i, (n, d, s) in enumerate(items)
            ],
            "dtype",
        ),
    ],
)
def test_bad_plan_is_refused_and_changes_nothing(engines, mutate, named):
    engine = engines["engine0"]
    msg, before = _bad_plan_message(engine, mutate)
    with RpcClient(engine.endpoint, timeout_s=10) as rpc:
        result = rpc.call(msg)
    assert isinstance(result, UpdateDone) and not result.success
    assert named in result.message or "expected" in result.message
    assert result.live_touched is False and result.weights_incomplete is False
    after = engine.fingerprints()
    assert after.weight_version == before.weight_version
    assert after.fingerprints == before.fingerprints
    assert engine.generate([[1, 2, 3]], greedy(2))[0].error == ""


def test_a_plan_writing_outside_a_tensor_is_refused_and_changes_nothing(engines):
    """An in-store plan whose first bucket sits 256 bytes off would write every tensor of it
    into its neighbour's bytes: the engine refuses it, naming the tensor, before a byte
    moves."""
    engine = engines["engine0"]
    with RpcClient(engine.endpoint, timeout_s=10) as rpc:
        specs = rpc.call(GetWeightSpecs()).specs
    items = [(s.name, s.dtype, tuple(s.shape)) for s in specs]
    plan = plan_in_store(items, {s.name: s.offset for s in specs}, 4096)
    first = plan.buckets[0]
    shifted = dataclasses.replace(first, store_offset=first.store_offset + 256)
    plan = dataclasses.replace(plan, buckets=[shifted, *plan.buckets[1:]])
    before = engine.fingerprints()
    msg = UpdateWeightsFromIPC(plan=plan, weight_version=10_000, push_id=1)
    with RpcClient(engine.endpoint, timeout_s=10) as rpc:
        result = rpc.call(msg)
    assert isinstance(result, UpdateDone) and not result.success
    assert f"bucket 0 tensor '{first.tensors[0].name}': would write bytes" in result.message
    assert result.live_touched is False and engine.fingerprints() == before


def test_pusher_refuses_wrong_weights_before_sending(engines, ckpt, versions, tmp_path):
    before = engines["engine0"].fingerprints()
    tensors = trainer_weights(ckpt, 99)
    tensors.pop("model.norm.weight")
    with pytest.raises(PushError, match="model.norm.weight"):
        push(engines, tmp_path, "ipc", tensors, next(versions))
    tensors = trainer_weights(ckpt, 99)
    tensors["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(PushError, match="model.norm.weight: shape"):
        push(engines, tmp_path, "ipc", tensors, next(versions))
    assert engines["engine0"].fingerprints() == before


def test_old_version_is_refused_by_every_engine(engines, ckpt, tmp_path):
    current = engines["engine0"].info().weight_version
    before = engines["engine0"].fingerprints().fingerprints
    with pytest.raises(PushError, match="not newer"):
        push(engines, tmp_path, "ipc", trainer_weights(ckpt, 5), current)
    assert engines["engine0"].fingerprints().fingerprints == before


def test_bf16_engine_gets_trainer_weights_cast_on_the_write(ckpt, cfg, tmp_path):
    """fp32 trainer -> bf16 engine over every path and load mode: the cast is folded into the
    one copy (or the pack), and the engine holds the cast bytes exactly."""
    engine = launch_engine(ckpt, kv_tokens=256, dtype="bfloat16", threads=1)
    try:
        version = 0
        for (transport, one_copy), load_mode in itertools.product(PATHS, ["in_place", "shadow"]):
            version += 1
            tensors = {n: t.float() for n, t in trainer_weights(ckpt, version).items()}
            cfg_ = sync_cfg(transport, load_mode=load_mode, one_copy=one_copy)
            pusher = WeightPusher(cfg_, {"bf16": engine.endpoint}, tmp_path / transport)
            try:
                assert pusher.push(tensors, version).failed == []
                assert pusher.mismatches(tensors) == {"bf16": []}
            finally:
                pusher.close()
        want = reference_tokens(cfg, tensors, PROMPTS, dtype=torch.bfloat16)
        assert [o.output_ids for o in engine.generate(PROMPTS, greedy())] == want
    finally:
        engine.close()


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
@pytest.mark.parametrize("one_copy", [True, False])
def test_a_hundred_pushes_leak_no_shared_memory_mappings_or_fds(
    engines, ckpt, versions, tmp_path, one_copy, load_mode
):
    pids = [c.process.pid for c in engines.values()]
    cfg_ = sync_cfg("ipc", one_copy=one_copy, load_mode=load_mode)
    pusher = WeightPusher(cfg_, endpoints(engines), tmp_path)
    try:
        for k in range(2):  # warm: buffers opened, both of an engine's stores mapped
            pusher.push(trainer_weights(ckpt, k), next(versions))
        fds_before = [fd_count(p) for p in pids]
        maps_before = _maps(os.getpid())
        engine_segments = [_segments_of(p) for p in pids]
        tensors = trainer_weights(ckpt, 1)
        for _ in range(100):
            assert pusher.push(tensors, next(versions)).failed == []
        assert [fd_count(p) for p in pids] == fds_before
        assert [_segments_of(p) for p in pids] == engine_segments  # stores kept, not re-made
        assert _maps(os.getpid()) == maps_before  # each store mapped once, kept
        assert len(own_shm_segments()) == 2  # one data + one control segment, reused
        stores = len(pusher.sender.stores)
        assert stores == (0 if not one_copy else 2 * len(pids) if load_mode == "shadow" else 2)
        assert pusher.mismatches(tensors) == {name: [] for name in engines}
    finally:
        pusher.close()
    assert own_shm_segments() == set()  # everything the pusher created is gone
    assert _maps(os.getpid()) == []  # and unmapped


def _segments_of(pid: int) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"rlsync-{pid}-")}


def _maps(pid: int) -> list[str]:
    """This process's mappings of rlsync segments (one line per mapped range)."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted(line.split(maxsplit=5)[-1] for line in f if f"{SHM_DIR}/rlsync-" in line)


def test_an_engine_with_private_weights_is_staged_and_refuses_direct_writes(
    engines, ckpt, versions, tmp_path
):
    """`--private-weights`: no layout is published, so a pusher over it and one of ours
    stages for both; an ipc plan that follows a layout is refused by it, naming why."""
    private = launch_engine(ckpt, kv_tokens=256, threads=1, extra_args=["--private-weights"])
    try:
        with RpcClient(private.endpoint, timeout_s=10) as rpc:
            assert rpc.call(GetWeightSpecs()).store_bytes == 0
        eps = {"private": private.endpoint, "exposed": engines["engine0"].endpoint}
        pusher = WeightPusher(sync_cfg("ipc"), eps, tmp_path)
        try:
            version = next(versions)
            tensors = trainer_weights(ckpt, version)
            assert pusher.push(tensors, version).failed == []
            assert not in_store(pusher.plan)
            assert pusher.mismatches(tensors) == {"private": [], "exposed": []}
        finally:
            pusher.close()
        with RpcClient(engines["engine0"].endpoint, timeout_s=10) as rpc:
            specs = rpc.call(GetWeightSpecs()).specs
        items = [(s.name, s.dtype, tuple(s.shape)) for s in specs]
        plan = plan_in_store(items, {s.name: s.offset for s in specs}, 1 << 20)
        msg = UpdateWeightsFromIPC(plan=plan, weight_version=10_000, push_id=1)
        with RpcClient(private.endpoint, timeout_s=10) as rpc:
            result = rpc.call(msg)
        assert not result.success and "cannot be written directly" in result.message
    finally:
        private.close()


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_broadcast_sends_large_tensors_as_they_are(
    engines, ckpt, versions, tmp_path, monkeypatch, load_mode
):
    """Tensors of at least `solo_bytes` get a bucket each and go on the wire straight from
    the trainer's memory (no pack); the engines land them in place, bit-exact, verified."""
    from rlsync.transports import broadcast

    monkeypatch.setattr(broadcast.Sender, "solo_bytes", 2048)
    packed: list[int] = []
    real_pack = broadcast.pack_bucket
    monkeypatch.setattr(
        broadcast, "pack_bucket", lambda b, t, out: (packed.append(1), real_pack(b, t, out))
    )
    version = next(versions)
    tensors = trainer_weights(ckpt, version)
    cfg_ = sync_cfg("broadcast", load_mode=load_mode, verify=True)
    pusher = WeightPusher(cfg_, endpoints(engines), tmp_path)
    try:
        assert pusher.push(tensors, version).failed == []
        solo = [b for b in pusher.plan.buckets if b.tensors[0].nbytes >= 2048]
        assert solo and all(len(b.tensors) == 1 for b in solo)
        assert len(packed) == len(pusher.plan.buckets) - len(solo)
        assert pusher.mismatches(tensors) == {name: [] for name in engines}
    finally:
        pusher.close()
