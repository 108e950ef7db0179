"""An engine that misses a push because it was frozen, not dead, comes back at the next one.

Real engine processes and a real WeightPusher. One of two engines is stopped (SIGSTOP) for a
whole push, so everything it is sent during that push (the update, the ping that marks it
dead, the AbortUpdate) waits in its socket and its accept would come long after
`timeout_s`; it is thawed (SIGCONT) once that push returned, while the pusher lives on. The
thawed engine must drop the update it woke up with (its bytes stay those of the version
before), and the next push must ping it, find it, push it in full and say so in the report
(`revived`), after which its weights are the trainer's bit for bit and its greedy tokens
equal the other engine's and a fresh engine's. Over ipc, broadcast and disk; independent,
`commit: atomic` and delta mode.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, reference_tokens, trainer_weights
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 2.0
TRANSPORTS = ["ipc", "broadcast", "disk"]
MODES = ["independent", "atomic", "delta"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=31)


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = {f"engine{i}": launch_engine(ckpt, kv_tokens=256, threads=1) for i in range(2)}
    yield clients
    for client in clients.values():
        client.close()


def sync_cfg(transport: str, mode: str) -> SyncConfig:
    extra: dict = {"delta": True} if mode == "delta" else {}
    if mode == "atomic":
        extra = {"commit": "atomic", "load_mode": "shadow", "pause_mode": "in_place"}
    return SyncConfig(transport=transport, bucket_mb=0.02, timeout_s=TIMEOUT_S, **extra)


def push_frozen(pusher: WeightPusher, engine, weights, version: int):
    """Push with `engine` stopped for the whole push; thaw it once the push returned. The
    report, or the PushError when the version reached no engine (atomic)."""
    os.kill(engine.process.pid, signal.SIGSTOP)
    try:
        return pusher.push(weights, version)
    except PushError as exc:
        return exc
    finally:
        os.kill(engine.process.pid, signal.SIGCONT)


def settled(engine, deadline_s: float):
    """The engine's state once it has no update in flight (it must answer every poll)."""
    deadline = time.monotonic() + deadline_s
    while True:
        info = engine.fingerprints(names=[])
        if not info.update_in_progress or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def tokens(engine) -> list[list[int]]:
    outs = engine.generate(PROMPTS, greedy())
    assert all(o.error == "" for o in outs), [o.error for o in outs]
    return [o.output_ids for o in outs]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_engine_frozen_across_a_push_gets_the_next_one_in_full(
    engines, ckpt, tmp_path, transport, mode
):
    frozen, other = engines["engine1"], engines["engine0"]
    v = max(c.info().weight_version for c in engines.values()) + 1
    endpoints = {n: c.endpoint for n, c in engines.items()}
    pusher = WeightPusher(sync_cfg(transport, mode), endpoints, tmp_path)
    try:
        assert pusher.push(trainer_weights(ckpt, v), v).failed == []
        held = frozen.fingerprints()

        missed = push_frozen(pusher, frozen, trainer_weights(ckpt, v + 1), v + 1)
        if mode == "atomic":  # the version landed nowhere, and the report says who stopped it
            assert isinstance(missed, PushError), missed
            assert "did not answer" in missed.report.aborted_because["engine1"]
            if transport != "broadcast":  # (a broadcast sends nothing: engine0 fails too)
                assert list(missed.report.aborted_because) == ["engine1"]
            assert other.info().weight_version == v
        else:
            assert missed.failed == ["engine1"] and missed.succeeded == ["engine0"]
        # the thawed engine drops what it woke up with: the old bytes serve on, whole
        woke = settled(frozen, 5.0)
        assert not woke.update_in_progress and not woke.weights_incomplete
        assert frozen.fingerprints() == held

        weights = trainer_weights(ckpt, v + 2)
        report = pusher.push(weights, v + 2)
        assert report.failed == [] and report.revived == ["engine1"], report.summary()
        assert "back after a missed push (sent in full): engine1" in report.summary()
        assert report.to_dict()["revived"] == ["engine1"]
        if mode == "delta":
            assert report.delta == "full: engine1 came back after a missed push"
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
        assert {c.info().weight_version for c in engines.values()} == {v + 2}
        want = reference_tokens(ModelConfig.from_dir(ckpt), weights, PROMPTS)
        assert tokens(frozen) == tokens(other) == want

        # it stays in the set: the next push reaches both, and is a delta again in delta mode
        again = pusher.push(trainer_weights(ckpt, v + 3), v + 3)
        assert again.failed == [] and again.revived == []
        if mode == "delta":
            assert again.delta.startswith("full: periodic") or again.delta == "delta"
        assert pusher.mismatches(trainer_weights(ckpt, v + 3)) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()


def test_an_engine_still_frozen_costs_the_next_pushes_nothing_and_stays_out(
    engines, ckpt, tmp_path
):
    """A truly unresponsive engine is pinged once, without a wait, when it is given up on;
    the pushes after the one it missed neither announce to it nor wait for it."""
    from trainer_side.sync.pusher import GIVEN_UP

    frozen = engines["engine1"]
    v = max(c.info().weight_version for c in engines.values()) + 1
    pusher = WeightPusher(
        sync_cfg("ipc", "independent"), {n: c.endpoint for n, c in engines.items()}, tmp_path
    )
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        assert pusher.push(trainer_weights(ckpt, v), v).failed == ["engine1"]
        for version in (v + 1, v + 2):
            start = time.monotonic()
            report = pusher.push(trainer_weights(ckpt, version), version)
            took = time.monotonic() - start
            assert report.failed == ["engine1"] and report.revived == []
            assert report.engines["engine1"].message == GIVEN_UP
            assert took < TIMEOUT_S  # never the announcement's wait, nor a ping's
            pending = {n: c.pending() for n, c in pusher.engines.clients.items()}
            assert pending == {"engine0": 0, "engine1": 1}  # one outstanding ping, no more
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    try:
        settled(frozen, 5.0)
        report = pusher.push(trainer_weights(ckpt, v + 3), v + 3)
        assert report.failed == [] and report.revived == ["engine1"]
        assert pusher.mismatches(trainer_weights(ckpt, v + 3)) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()


def test_a_killed_engine_is_not_pinged_at_all(ckpt, tmp_path):
    """Its socket file is still there but nobody listens: known gone, it costs nothing."""
    alive, doomed = (launch_engine(ckpt, kv_tokens=256, threads=1) for _ in range(2))
    try:
        pusher = WeightPusher(
            sync_cfg("ipc", "independent"),
            {"alive": alive.endpoint, "doomed": doomed.endpoint},
            tmp_path,
        )
        try:
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            assert pusher.push(trainer_weights(ckpt, 1), 1).failed == ["doomed"]
            start = time.monotonic()
            report = pusher.push(trainer_weights(ckpt, 2), 2)
            assert time.monotonic() - start < 2.0  # no 3 s ping of a process that is gone
            assert report.failed == ["doomed"] and report.revived == []
        finally:
            pusher.close()
    finally:
        alive.close()
        doomed.close()
