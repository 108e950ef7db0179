"""Freeze as a fault class of its own: a process SIGSTOPped in the middle of a push and
SIGCONTed later (after the pusher's timeout: it comes back late; before it: a pause that
must cost nothing), while everything else lives on. Frozen here: an engine (the test
pushes in process), a pusher process, and a trainer rank > 0 of a sharded (FSDP2) push.

After every case: each engine serves the checkpoint of the version it reports, bit for
bit and token for token, or refuses with "weights incomplete"; each push and each
engine's update ends within its documented bound (plus slack for a loaded machine); and
the next push reaches every engine that is alive. The engines are shared by the module
and brought back to one known version (a full push) before each case.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.sync_helpers import PROMPTS, greedy
from tests.reliability.conftest import launch_many
from tests.reliability.freeze_cases import (
    AFTER,
    ANNOUNCE,
    BEFORE,
    BUCKET0,
    READY,
    SLACK_S,
    THAW_BEFORE,
    Case,
    Rig,
    param,
    push_bound_s,
)
from tests.reliability.freeze_checks import Checkpoints, stopped, thaw
from tests.reliability.freeze_procs import START_S, PusherProc
from tests.reliability.freeze_run import (
    assert_reached,
    judge,
    run_engine_freeze,
    settled_verdicts,
)
from tests.reliability.freeze_shards import ShardRun
from tests.reliability.model import reference_outputs
from tests.reliability.procs import own_segments

TIMEOUT_S = 2.0
MODES = [("in_place", "independent"), ("shadow", "independent"), ("shadow", "atomic")]


def _matrix() -> list[tuple[str, str, str, str]]:
    """Every (transport, load_mode, commit, moment) that means something: mid-transfer only
    where the pusher moves the bytes (not disk), ready-to-commit only for atomic."""
    out = []
    for t in ("ipc", "broadcast", "disk"):
        for m, c in MODES:
            moments = [ANNOUNCE] + [BUCKET0] * (t != "disk") + [READY] * (c == "atomic")
            out += [(t, m, c, moment) for moment in moments]
    return out


def _engine_cases() -> list[object]:
    """The whole matrix for our engine (two engines, both thaws; one engine, thawed late;
    the staging ipc path); the CI part first, the rest marked slow."""
    fast = [Case(t, m, c) for t in ("ipc", "broadcast") for m, c in MODES[:2]]
    fast += [
        Case("ipc", "shadow", "atomic"),
        Case("disk", "in_place"),
        Case("disk", "shadow", "atomic"),
        Case("broadcast", "in_place", moment=BUCKET0),
        Case("ipc", "in_place", moment=BUCKET0),
        Case("ipc", "shadow", "atomic", READY),
        Case("ipc", "in_place", moment=ANNOUNCE, thaw=BEFORE),
        Case("ipc", "in_place", engines=1),
        Case("broadcast", "shadow", "atomic", engines=1),
    ]
    every = []
    for t, m, c, moment in _matrix():
        every += [Case(t, m, c, moment, w) for w in (AFTER, BEFORE)]
        every.append(Case(t, m, c, moment, AFTER, engines=1))
    for m, c in MODES:
        every += [Case("ipc", m, c, moment, one_copy=False) for moment in (ANNOUNCE, BUCKET0)]
    return [param(c) for c in fast] + [param(c, slow=True) for c in every if c not in fast]


@pytest.fixture(scope="module")
def rig(ckpt, cfg, tmp_path_factory):
    engines = dict(zip(("e0", "e1"), launch_many(ckpt, 2), strict=True))
    dtypes = {s.name: s.dtype for s in engines["e0"].weight_specs().specs}
    reference = lambda t: reference_outputs(cfg, t, PROMPTS, [greedy()] * len(PROMPTS))  # noqa: E731
    checkpoints = Checkpoints(ckpt, dtypes, reference)
    rig = Rig(
        engines,
        checkpoints,
        tmp_path_factory.mktemp("freeze"),
        lambda name: launch_many(ckpt, 1)[0],
    )
    yield rig
    for engine in rig.engines.values():
        engine.close()


@pytest.mark.parametrize("case", _engine_cases())
def test_a_frozen_engine_serves_what_it_reports_and_the_next_push_reaches_it(
    rig, monkeypatch, case
):
    run_engine_freeze(rig, case, TIMEOUT_S, monkeypatch)


def _pusher_cases() -> list[object]:
    """Two engines, every moment thawed late, before the timeout at the announcement; one
    engine per transport; the CI part first."""
    fast = [Case("ipc", "in_place", moment=BUCKET0), Case("broadcast", "shadow", "atomic")]
    every = [Case(t, m, c, moment) for t, m, c, moment in _matrix()]
    every += [
        Case(t, m, c, ANNOUNCE, BEFORE) for t, m, c, moment in _matrix() if moment == ANNOUNCE
    ]
    every += [Case(t, "in_place", engines=1) for t in ("ipc", "broadcast", "disk")]
    return [param(c) for c in fast] + [param(c, slow=True) for c in every if c not in fast]


PUSHER_LATE_S = 2 * TIMEOUT_S + 1.0
"""A pusher thawed AFTER comes back past the engines' longest wait (the first bucket's)."""


@pytest.mark.parametrize("case", _pusher_cases())
def test_a_frozen_pusher_leaves_every_engine_consistent_and_its_next_push_reaches_them(
    rig, tmp_path, case
):
    rig.restore()
    names = rig.names(case.engines)
    cfg = case.sync(TIMEOUT_S)
    versions = rig.reserve(2)
    endpoints = {n: rig.engines[n].endpoint for n in names}
    proc = PusherProc(endpoints, case, TIMEOUT_S, rig.checkpoints.ckpt, versions, tmp_path)
    bound = push_bound_s(cfg) + SLACK_S
    try:
        proc.expect("READY", START_S)
        proc.go()
        proc.wait_stopped(bound)
        time.sleep(THAW_BEFORE * TIMEOUT_S if case.thaw == BEFORE else PUSHER_LATE_S)
        thaw(proc.pid)
        thawed_at = time.monotonic()
        first = proc.result(1, bound)
        back_s = time.monotonic() - thawed_at
        assert back_s < bound, f"the thawed pusher's push went on {back_s:.1f}s: {first}"
        if case.thaw == BEFORE:
            assert first["succeeded"] == names, f"a short freeze failed the push: {first}"
        judge(rig, names, cfg, f"after the frozen push (v{versions[0]})")
        proc.go()
        second = proc.result(2, bound)
        assert second["seconds"] < bound, second
        assert_reached(settled_verdicts(rig, names, cfg), versions[1])
        assert second["succeeded"] == names, second
    finally:
        proc.close()
    assert own_segments(proc.pid) == set()


def _brief(result: dict) -> str:
    """A rank's push result in one line: its error, or each engine's outcome."""
    engines = {n: o.get("message", "")[:200] for n, o in result.get("engines", {}).items()}
    return f"{result.get('push_error', '')[:300]} engines: {engines}"


def _shard_cases() -> list[object]:
    """Rank 1 frozen after its rows of bucket 0: every transport and mode thawed late, and
    in_place thawed before the timeout; the CI part first."""
    fast = [Case("ipc", "in_place", moment=BUCKET0)]
    every = [Case(t, m, c, BUCKET0) for t in ("ipc", "broadcast") for m, c in MODES]
    every += [Case(t, "in_place", moment=BUCKET0, thaw=BEFORE) for t in ("ipc", "broadcast")]
    return [param(c) for c in fast] + [param(c, slow=True) for c in every if c not in fast]


@pytest.mark.parametrize("case", _shard_cases())
def test_a_frozen_trainer_rank_leaves_every_engine_consistent_and_the_next_push_reaches_them(
    rig, tmp_path, case
):
    rig.restore()
    names = rig.names(case.engines)
    cfg = case.sync(TIMEOUT_S)
    versions = rig.reserve(2)
    endpoints = {n: rig.engines[n].endpoint for n in names}
    run = ShardRun(2, rig.checkpoints.ckpt, endpoints, cfg, tmp_path, versions, stop_rank=1)
    bound = push_bound_s(cfg) + SLACK_S
    try:
        run.go(1)
        deadline = time.monotonic() + START_S + bound
        while not stopped(run.pid(1)):
            assert time.monotonic() < deadline, "rank 1 never reached bucket 0"
            time.sleep(0.01)
        stopped_at = time.monotonic()
        if case.thaw == BEFORE:
            time.sleep(THAW_BEFORE * TIMEOUT_S)
            thaw(run.pid(1))
        first = run.result(1, 0, bound)
        time.sleep(max(stopped_at + TIMEOUT_S + 0.5 - time.monotonic(), 0.0))
        thaw(run.pid(1))
        follower = run.result(1, 1, bound)
        assert first["seconds"] < bound + THAW_BEFORE * TIMEOUT_S, _brief(first)
        if case.thaw == BEFORE:
            assert first.get("failed") == [] and "push_error" not in first, first
        judge(rig, names, cfg, f"after the frozen rank's push (v{versions[0]})")
        run.go(2)
        second = run.result(2, 0, bound)
        assert "push_error" not in second and second["failed"] == [], _brief(second)
        assert_reached(settled_verdicts(rig, names, cfg), versions[1])
        # ShardedPusher.push on a rank > 0 returns what it wrote; rank 0 reports failures
        assert "error" not in follower, f"rank 1's push raised: {follower['error']}"
    finally:
        thaw(run.pid(1))
        run.close()
