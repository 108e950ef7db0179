"""WeightPusher against a real engine core served over a real ZMQ socket (in a thread, so the
test can read what the engine received): the plan crosses the wire once, an engine that lost
it gets it again, idle_timeout_s reaches the engine, and no socket leaks when the transport
cannot open."""

from __future__ import annotations

import threading

import pytest

from infer_side.engines.native.engine_core import EngineCore
from infer_side.process.server import serve
from rlsync.config import EngineConfig, SyncConfig
from rlsync.transports import registry
from rlsync.wire.endpoints import private_ipc_endpoint, remove_private_endpoint
from rlsync.wire.protocol import BucketUpdate, Shutdown
from rlsync.wire.rpc import RpcClient
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync import pusher as pusher_module
from trainer_side.sync.pusher import WeightPusher


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture
def engine(ckpt):
    """(endpoint, core, the update messages it received)."""
    core = EngineCore.from_checkpoint(ckpt, EngineConfig(kv_tokens=128))
    received: list[BucketUpdate] = []
    process = core.process

    def recording(msg):
        if isinstance(msg, BucketUpdate):
            received.append(msg)
        return process(msg)

    core.process = recording
    endpoint = private_ipc_endpoint("engine")
    ready = threading.Event()
    thread = threading.Thread(
        target=serve, args=(core, endpoint, lambda _: ready.set()), daemon=True
    )
    thread.start()
    assert ready.wait(10)
    yield endpoint, core, received
    with RpcClient(endpoint, timeout_s=10) as rpc:
        rpc.call(Shutdown())
    thread.join(10)
    remove_private_endpoint(endpoint)


@pytest.mark.parametrize("transport", ["ipc", "broadcast"])
def test_the_plan_crosses_the_wire_once(engine, ckpt, tmp_path, transport):
    endpoint, core, received = engine
    pusher = WeightPusher(
        SyncConfig(transport=transport, bucket_mb=0.01, timeout_s=20), {"e": endpoint}, tmp_path
    )
    try:
        first = pusher.push(trainer_weights(ckpt, 1), 1)
        second = pusher.push(trainer_weights(ckpt, 2), 2)
        assert first.plan_sent and not second.plan_sent
        assert [m.plan is not None for m in received] == [True, False]
        assert received[0].plan_id == received[1].plan_id == pusher.plan_id
        assert len(received[0].plan.buckets) > 1
        assert pusher.mismatches(trainer_weights(ckpt, 2)) == {"e": []}
        assert core.weight_version == 2
    finally:
        pusher.close()


def test_an_engine_that_lost_the_plan_is_sent_it_again(engine, ckpt, tmp_path):
    endpoint, core, received = engine
    pusher = WeightPusher(SyncConfig(bucket_mb=0.01, timeout_s=20), {"e": endpoint}, tmp_path)
    try:
        pusher.push(trainer_weights(ckpt, 1), 1)
        core.updates.plans.plans.clear()  # as after an engine restart
        report = pusher.push(trainer_weights(ckpt, 2), 2)
        assert report.failed == [] and report.plan_sent
        assert [m.plan is not None for m in received] == [True, False, True]
        assert pusher.mismatches(trainer_weights(ckpt, 2)) == {"e": []}
    finally:
        pusher.close()


def test_idle_timeout_s_reaches_the_engine(engine, ckpt, tmp_path):
    endpoint, _, received = engine
    pusher = WeightPusher(SyncConfig(idle_timeout_s=0.25, timeout_s=20), {"e": endpoint}, tmp_path)
    try:
        assert pusher.push(trainer_weights(ckpt, 1), 1).failed == []
        assert received[0].idle_timeout_s == 0.25
    finally:
        pusher.close()


def test_pusher_closes_its_sockets_when_the_transport_cannot_open(engine, tmp_path, monkeypatch):
    endpoint, _, _ = engine
    made = []

    class Recorded(pusher_module.EngineSet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class Refusing(registry.sender_class("ipc")):
        def __init__(self, *args):
            raise RuntimeError("rendezvous failed")

    monkeypatch.setattr(pusher_module, "EngineSet", Recorded)
    monkeypatch.setattr(registry, "sender_class", lambda kind: Refusing)
    with pytest.raises(RuntimeError, match="rendezvous failed"):
        WeightPusher(SyncConfig(), {"e": endpoint}, tmp_path)
    (engines,) = made
    assert [c._sock for c in engines.clients.values()] == [None]


def test_a_failed_broadcast_update_is_followed_by_a_working_group(
    engine, ckpt, tmp_path, monkeypatch
):
    """The engine drops a group whose update failed; the next push forms a new one."""
    from rlsync.transports import integrity

    endpoint, core, _ = engine
    seal, flipped = integrity.seal, []

    def corrupt_once(index, buf, nbytes):
        seal(index, buf, nbytes)
        if not flipped:
            flipped.append(index)
            buf[0] ^= 0xFF

    pusher = WeightPusher(
        SyncConfig(transport="broadcast", verify=True, timeout_s=20), {"e": endpoint}, tmp_path
    )
    try:
        monkeypatch.setattr(integrity, "seal", corrupt_once)
        with pytest.raises(pusher_module.PushError, match="fingerprint|Integrity"):
            pusher.push(trainer_weights(ckpt, 1), 1)
        assert core.weight_version == 0
        report = pusher.push(trainer_weights(ckpt, 2), 2)
        assert report.failed == [] and core.weight_version == 2
        assert pusher.mismatches(trainer_weights(ckpt, 2)) == {"e": []}
    finally:
        pusher.close()
