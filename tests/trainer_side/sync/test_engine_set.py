"""EngineSet against a real engine process that is frozen (SIGSTOP) and thawed: requests it
gives up on are forgotten (the client's bookkeeping stays flat however often that happens),
late replies to them are never taken for a later request's, and `revive` brings an engine
marked dead back once it answers, at the cost of one bounded ping while it does not."""

from __future__ import annotations

import os
import signal
import time

import pytest

from infer_side.process.client import launch_engine
from rlsync.wire.protocol import (
    AbortUpdate,
    EngineDied,
    EngineInfo,
    GetInfo,
    GetWeightsFingerprint,
    WeightFingerprints,
)
from tests.checkpoints import make_hf_checkpoint
from trainer_side.sync.engine_set import REVIVE_WAIT_S, EngineSet


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    client = launch_engine(make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=8), threads=1)
    yield client
    client.close()


@pytest.fixture
def engines(engine):
    es = EngineSet({"e": engine.endpoint}, timeout_s=5.0)
    yield es
    es.close()


def stopped(engine):
    os.kill(engine.process.pid, signal.SIGSTOP)


def resumed(engine):
    os.kill(engine.process.pid, signal.SIGCONT)


def test_a_late_reply_is_never_taken_for_the_next_requests(engine, engines):
    stopped(engine)
    try:
        late = engines.gather(engines.send({"e": GetInfo()}), 0.3)["e"]
    finally:
        resumed(engine)
    assert isinstance(late, EngineDied) and "did not answer" in late.message
    assert engines.clients["e"].pending() == 0  # given up on: forgotten
    rids = engines.send({"e": GetWeightsFingerprint(names=[])})
    reply = engines.gather(rids, 10.0)["e"]  # the thawed engine answers the GetInfo first
    assert isinstance(reply, WeightFingerprints) and reply.request_id == rids["e"]
    assert isinstance(engines.gather(engines.send({"e": GetInfo()}), 10.0)["e"], EngineInfo)


def test_bookkeeping_stays_flat_against_an_engine_that_keeps_freezing(engine, engines):
    client = engines.clients["e"]
    for _ in range(25):
        stopped(engine)
        try:
            assert isinstance(engines.call_all(GetInfo, 0.05)["e"], EngineDied)
            engines.tell({"e": AbortUpdate(weight_version=10**6)})  # answered by a failure
        finally:
            resumed(engine)
        assert client.pending() == 0
    assert isinstance(engines.call_all(GetInfo, 10.0)["e"], EngineInfo)  # 50 late replies
    assert client.pending() == 0


def test_revive_waits_for_no_silent_engine_and_brings_it_back_once_it_answers(engine, engines):
    stopped(engine)
    try:
        engines.give_up(["e"])
        for _ in range(20):  # one ping outstanding however often it is read
            start = time.monotonic()
            assert engines.revive() == [] and engines.dead == {"e"}
            assert time.monotonic() - start < REVIVE_WAIT_S + 0.5
            assert engines.clients["e"].pending() == 1
    finally:
        resumed(engine)
    assert engines.revive(wait_s=10.0) == ["e"]
    assert engines.dead == set() and engines.live() == ["e"]
    assert engines.clients["e"].pending() == 0
