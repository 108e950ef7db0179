"""The atomic commit across engines, with real engine processes and a real WeightPusher:
a version lands on every engine (bit-exact) or on none. An engine that refuses (it already
serves a newer version), or is SIGKILLed mid-transfer, leaves every other engine on the old
version serving the old bytes exactly, and the report names it; an engine told nothing
after it reported ready discards the update on its own within its commit_timeout_s."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rlsync.transports.ipc as ipc
from infer_side.process.client import launch_engine
from rlsync.config import ConfigError, SyncConfig
from rlsync.model_config import ModelConfig
from rlsync.wire.protocol import (
    UpdateAccepted,
    UpdateDone,
    UpdateReady,
    UpdateWeightsFromDisk,
)
from rlsync.wire.rpc import RpcClient
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, reference_tokens, trainer_weights
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 3.0
NAMES = ("e0", "e1", "e2")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=21)


@pytest.fixture(scope="module")
def engines(ckpt):
    with ThreadPoolExecutor(len(NAMES)) as pool:
        futures = {n: pool.submit(launch_engine, ckpt, kv_tokens=256, threads=1) for n in NAMES}
        clients = {n: f.result() for n, f in futures.items()}
    yield clients
    for client in clients.values():
        client.close()


def atomic_cfg(transport: str = "ipc", **kw) -> SyncConfig:
    kw.setdefault("pause_mode", "in_place")
    return SyncConfig(
        transport=transport,
        load_mode="shadow",
        commit="atomic",
        bucket_mb=0.02,
        timeout_s=TIMEOUT_S,
        **kw,
    )


def next_version(clients) -> int:
    return max(c.info().weight_version for c in clients) + 1


def snapshot(clients) -> dict:
    """Each engine's version, fingerprints and greedy tokens: what "unchanged" means."""
    return {
        name: (
            c.fingerprints(),
            [o.output_ids for o in c.generate(PROMPTS, greedy())],
        )
        for name, c in clients.items()
    }


@pytest.mark.parametrize("transport", ["broadcast", "ipc", "disk"])
def test_atomic_push_lands_the_same_version_on_every_engine(engines, ckpt, tmp_path, transport):
    version = next_version(engines.values())
    tensors = trainer_weights(ckpt, version)
    pusher = WeightPusher(
        atomic_cfg(transport), {n: c.endpoint for n, c in engines.items()}, tmp_path
    )
    try:
        report = pusher.push(tensors, version)
        assert report.failed == [] and report.succeeded == sorted(NAMES), report.summary()
        assert report.commit == "atomic" and report.aborted_because == {}
        assert pusher.mismatches(tensors) == {n: [] for n in NAMES}
    finally:
        pusher.close()
    stamps = [report.engines[n].done.committed_at for n in NAMES]
    assert all(s > 0 for s in stamps)
    assert report.commit_skew_s == max(stamps) - min(stamps) >= 0
    want = reference_tokens(ModelConfig.from_dir(ckpt), tensors, PROMPTS)
    for client in engines.values():
        outs = client.generate(PROMPTS, greedy())
        assert [o.output_ids for o in outs] == want
        assert {o.weight_version for o in outs} == {version}
    prints = [c.fingerprints() for c in engines.values()]
    assert all(p == prints[0] for p in prints) and prints[0].weight_version == version


def test_an_engine_that_refuses_aborts_the_version_everywhere(engines, ckpt, tmp_path):
    ahead = engines["e2"]
    first = next_version(engines.values())
    solo = WeightPusher(SyncConfig(timeout_s=TIMEOUT_S), {"e2": ahead.endpoint}, tmp_path / "s")
    try:  # e2 already serves a newer version: it must refuse the next one
        assert solo.push(trainer_weights(ckpt, first + 5), first + 5).failed == []
    finally:
        solo.close()
    before = snapshot(engines)
    pusher = WeightPusher(
        atomic_cfg("ipc", pause_mode=None),
        {n: c.endpoint for n, c in engines.items()},
        tmp_path / "a",
    )
    try:
        with pytest.raises(PushError) as info:
            pusher.push(trainer_weights(ckpt, first), first)
        report = info.value.report
        assert list(report.aborted_because) == ["e2"]
        assert "not newer" in report.aborted_because["e2"]
        assert report.failed == sorted(NAMES) and report.succeeded == []
        for name in ("e0", "e1"):  # they had the bytes in their shadow, and discarded them
            done = report.engines[name].done
            assert done is not None and "aborted by the pusher" in done.message
            assert done.committed_at == 0 and "e2" in report.engines[name].message
        assert snapshot(engines) == before  # every engine serves what it served, exactly
        # the next version is newer everywhere: it lands on all three
        again = first + 6
        assert pusher.push(trainer_weights(ckpt, again), again).failed == []
        assert pusher.mismatches(trainer_weights(ckpt, again)) == {n: [] for n in NAMES}
    finally:
        pusher.close()


def test_an_engine_killed_mid_transfer_aborts_the_version_everywhere(
    engines, ckpt, tmp_path, monkeypatch
):
    doomed = launch_engine(ckpt, kv_tokens=256, threads=1)
    survivors = {n: engines[n] for n in ("e0", "e1")}
    try:
        version = next_version([*survivors.values(), doomed])
        real, packed = ipc.pack_bucket, []

        def pack_then_kill(bucket, tensors, out):  # noqa: ANN001 - pack_bucket's signature
            real(bucket, tensors, out)
            packed.append(1)
            if len(packed) == 3:  # buckets 0-1 are out: doomed has accepted and is loading
                os.kill(doomed.process.pid, signal.SIGKILL)
                doomed.process.wait(timeout=10)

        monkeypatch.setattr(ipc, "pack_bucket", pack_then_kill)
        before = snapshot(survivors)
        endpoints = {**{n: c.endpoint for n, c in survivors.items()}, "doomed": doomed.endpoint}
        pusher = WeightPusher(atomic_cfg("ipc"), endpoints, tmp_path)
        try:
            start = time.monotonic()
            with pytest.raises(PushError) as info:
                pusher.push(trainer_weights(ckpt, version), version)
            took = time.monotonic() - start
            report = info.value.report
            assert len(packed) >= 3 and "doomed" in report.aborted_because
            assert set(report.aborted_because) <= {"doomed", "(pusher)"}
            assert report.failed == ["doomed", "e0", "e1"]
            assert "doomed" in report.summary()
        finally:
            pusher.close()
        assert took < 4 * TIMEOUT_S + 10
        assert snapshot(survivors) == before
    finally:
        doomed.close()


def test_an_engine_never_told_discards_within_its_commit_timeout(engines, ckpt, tmp_path):
    """The pusher vanishes after the engine reported ready (here: the test is the pusher
    and simply stops talking)."""
    engine = engines["e1"]
    target = make_hf_checkpoint(tmp_path, seed=22)
    before = snapshot({"e1": engine})
    version = engine.info().weight_version + 1
    msg = UpdateWeightsFromDisk(
        path=str(target),
        weight_version=version,
        load_mode="shadow",
        pause_mode="in_place",  # generation goes on while the update is held ready
        commit="atomic",
        commit_timeout_s=2.5,
        timeout_s=TIMEOUT_S,
    )
    with RpcClient(engine.endpoint, timeout_s=30) as rpc:
        sent = rpc.send(msg)
        assert isinstance(rpc.recv(10), UpdateAccepted)
        ready = rpc.recv(10)
        assert isinstance(ready, UpdateReady) and ready.weight_version == version
        ready_at = time.monotonic()
        held = snapshot({"e1": engine})["e1"]  # ready changes nothing that is served
        assert held[0].update_in_progress and held[0].fingerprints == before["e1"][0].fingerprints
        assert held[1] == before["e1"][1] and held[0].weight_version == version - 1
        done = rpc.recv(10)
        waited = time.monotonic() - ready_at
    assert isinstance(done, UpdateDone) and done.request_id == sent.request_id
    assert not done.success and "no CommitUpdate or AbortUpdate" in done.message
    assert 2.0 < waited < 5.0
    assert snapshot({"e1": engine}) == before


def test_atomic_in_place_is_refused_before_anything_is_sent():
    with pytest.raises(ConfigError, match="commit: 'atomic' needs load_mode 'shadow'"):
        SyncConfig(commit="atomic")


def test_an_engine_dead_after_the_commit_went_out_is_named_and_the_others_switched(
    engines, ckpt, tmp_path, monkeypatch
):
    """The window two phases cannot close (docs/RELIABILITY.md): every engine reported ready,
    then one dies just before the commit reaches it."""
    from trainer_side.sync import atomic_commit

    doomed = launch_engine(ckpt, kv_tokens=256, threads=1)
    survivors = {n: engines[n] for n in ("e0", "e1")}
    try:
        version = next_version([*survivors.values(), doomed])
        real_tell = atomic_commit.AtomicRound._tell

        def kill_then_tell(self, kind, names):  # noqa: ANN001 - the method's signature
            if kind is atomic_commit.CommitUpdate:
                os.kill(doomed.process.pid, signal.SIGKILL)
                doomed.process.wait(timeout=10)
            real_tell(self, kind, names)

        monkeypatch.setattr(atomic_commit.AtomicRound, "_tell", kill_then_tell)
        endpoints = {**{n: c.endpoint for n, c in survivors.items()}, "doomed": doomed.endpoint}
        tensors = trainer_weights(ckpt, version)
        pusher = WeightPusher(atomic_cfg("ipc"), endpoints, tmp_path)
        try:
            report = pusher.push(tensors, version)  # some engines got it: no PushError
            assert report.failed == ["doomed"] and report.succeeded == ["e0", "e1"]
            assert "no switch confirmed after CommitUpdate" in report.engines["doomed"].message
            assert report.aborted_because == {}
            assert pusher.mismatches(tensors) == {"e0": [], "e1": []}
        finally:
            pusher.close()
    finally:
        doomed.close()


def test_an_engine_frozen_at_the_announcement_drops_the_update_at_once_when_thawed(
    engines, ckpt, tmp_path
):
    """One of two engines is stopped (SIGSTOP) before the announcement and thawed while the
    push is still aborting. It wakes up with the update in its socket and, right behind it,
    the AbortUpdate every engine not known done is told: it must drop the update at once
    (not hold admission until its commit_timeout_s), keep its old bytes, and take the next
    update right away."""
    pair = {n: engines[n] for n in ("e0", "e1")}
    frozen = engines["e1"]
    cfg = atomic_cfg("ipc")
    assert cfg.commit_wait_s > 20  # what the engine would otherwise hold the update for
    before = snapshot(pair)
    version = next_version(pair.values())
    pusher = WeightPusher(cfg, {n: c.endpoint for n, c in pair.items()}, tmp_path)
    try:
        os.kill(frozen.process.pid, signal.SIGSTOP)
        thaw = threading.Timer(TIMEOUT_S + 0.5, os.kill, (frozen.process.pid, signal.SIGCONT))
        thaw.start()
        try:
            with pytest.raises(PushError) as info:
                pusher.push(trainer_weights(ckpt, version), version)
        finally:
            thaw.join()
            os.kill(frozen.process.pid, signal.SIGCONT)
        thawed_at = time.monotonic()
        assert list(info.value.report.aborted_because) == ["e1"]
        while frozen.fingerprints(names=[]).update_in_progress:
            assert time.monotonic() - thawed_at < 5.0, "the thawed engine still holds the update"
            time.sleep(0.05)
        assert snapshot(pair) == before  # neither engine switched; e1's bytes are the old ones
        start = time.monotonic()
        again = pusher.push(trainer_weights(ckpt, version + 1), version + 1)
        assert time.monotonic() - start < cfg.commit_wait_s / 2
        assert again.failed == [] and again.aborted_because == {}, again.summary()
        assert pusher.mismatches(trainer_weights(ckpt, version + 1)) == {"e0": [], "e1": []}
    finally:
        pusher.close()
