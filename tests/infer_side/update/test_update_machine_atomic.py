"""The atomic commit in the update state machine, in-process (the fakes of
`test_update_machine`): READY is reported once the shadow holds every byte, the switch waits
for CommitUpdate, AbortUpdate or the engine's own commit_timeout_s discards it with the live
weights untouched, and wrong or late commit calls change nothing."""

from __future__ import annotations

import time

import pytest

from infer_side.update.update_machine import Stage
from rlsync.wire.protocol import (
    AbortUpdate,
    CommitUpdate,
    Result,
    UpdateAccepted,
    UpdateDone,
    UpdateReady,
)
from tests.infer_side.update.test_update_machine import machine, update, values  # noqa: F401


def atomic(version: int, **kw):
    kw.setdefault("load_mode", "shadow")
    return update(version, commit="atomic", **kw)


def poll_until(m, kind: type, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for reply in m.poll():
            if isinstance(reply, kind):
                return reply
        time.sleep(0.002)
    raise AssertionError(f"no {kind.__name__}; stage {m.job.stage if m.job else None}")


def ready_machine(machine, version: int = 1, **kw):  # noqa: F811 - the imported fixture
    m, engine, receiver = machine
    (accepted,) = m.process(atomic(version, **kw))
    assert isinstance(accepted, UpdateAccepted)
    receiver.value = float(version)
    receiver.release()
    ready = poll_until(m, UpdateReady)
    assert (ready.request_id, ready.weight_version, ready.bytes) == (f"u{version}", version, 36)
    assert m.job.stage is Stage.READY
    return m, engine, receiver


def test_ready_holds_the_shadow_until_the_commit(machine):  # noqa: F811
    m, engine, _ = ready_machine(machine, pause_mode="in_place")
    for _ in range(20):  # held: nothing switches, the loop may sleep
        assert m.poll() == [] and not m.busy()
    assert engine.weight_version == 0 and values(engine.live) == {"a": 0.0, "b": 0.0}
    assert engine.calls == ["new_shadow"]  # not even paused yet
    result, done = m.process(CommitUpdate(request_id="c", weight_version=1))
    assert isinstance(result, Result) and result.success and result.request_id == "c"
    assert isinstance(done, UpdateDone) and done.success and done.request_id == "u1"
    assert done.weight_version == engine.weight_version == 1
    assert values(engine.live) == {"a": 1.0, "b": 1.0}
    assert engine.calls == ["new_shadow", "pause:in_place", "apply", "flush:False", "continue"]
    assert abs(done.committed_at - time.time()) < 5 and m.job is None


def test_pause_mode_none_waits_for_idle_before_ready_and_holds_admission(machine):  # noqa: F811
    m, engine, receiver = machine
    engine.running = 1
    m.process(atomic(1))
    receiver.release()
    for _ in range(50):
        assert not any(isinstance(r, UpdateReady) for r in m.poll())
        time.sleep(0.002)
    assert m.job.stage is Stage.RECEIVED and m.admission_held
    engine.running = 0
    poll_until(m, UpdateReady)
    assert m.admission_held  # nothing new may start: the commit must be immediate
    _, done = m.process(CommitUpdate(request_id="c", weight_version=1))
    assert done.success and not m.admission_held and engine.weight_version == 1


@pytest.mark.parametrize("stage", ["receiving", "ready"])
def test_abort_discards_and_leaves_the_old_weights(machine, stage):  # noqa: F811
    m, engine, receiver = machine
    if stage == "ready":
        ready_machine(machine, pause_mode="abort")
    else:
        m.process(atomic(1, pause_mode="abort"))
        receiver.release(1)  # one tensor in the shadow, the worker waits for the next
        deadline = time.monotonic() + 10
        while not m.job.writer.touched:
            assert time.monotonic() < deadline
            time.sleep(0.002)
    result, done = m.process(AbortUpdate(request_id="x", weight_version=1))
    assert result.success and not done.success and "aborted by the pusher" in done.message
    assert done.weight_version == engine.weight_version == 0 and done.committed_at == 0.0
    assert values(engine.live) == {"a": 0.0, "b": 0.0} and "apply" not in engine.calls
    assert m.job is None and engine.paused is None
    if stage == "receiving":  # the cancelled worker stops at its next write
        receiver.release(1)
        m.abandoned.thread.join(10)
    m.process(atomic(2, pause_mode="abort"))  # the next update goes through
    receiver.value = 2.0
    receiver.release()
    poll_until(m, UpdateReady)
    _, done = m.process(CommitUpdate(request_id="c2", weight_version=2))
    assert done.success and values(engine.live) == {"a": 2.0, "b": 2.0}


def test_an_engine_never_told_discards_after_commit_timeout_s(machine):  # noqa: F811
    m, engine, _ = ready_machine(machine, commit_timeout_s=0.3)
    start = time.monotonic()
    while not m.busy():
        assert time.monotonic() - start < 5
        time.sleep(0.01)
    (done,) = m.poll()
    waited = time.monotonic() - start
    assert 0.25 < waited < 2.0
    assert not done.success and "commit_timeout_s (0.3s)" in done.message
    assert engine.weight_version == 0 and values(engine.live) == {"a": 0.0, "b": 0.0}
    assert not m.admission_held and m.job is None
    (late,) = m.process(CommitUpdate(request_id="late", weight_version=1))
    assert not late.success and "no such update" in late.message
    assert engine.weight_version == 0


def test_wrong_commit_calls_are_refused_and_change_nothing(machine):  # noqa: F811
    m, engine, receiver = machine
    (none,) = m.process(CommitUpdate(request_id="c0", weight_version=1))
    assert not none.success and "in flight: none" in none.message
    m.process(atomic(1))
    (early,) = m.process(CommitUpdate(request_id="c1", weight_version=1))
    assert not early.success and "receiving, not ready" in early.message
    receiver.release()
    poll_until(m, UpdateReady)
    (other,) = m.process(CommitUpdate(request_id="c2", weight_version=2))
    assert not other.success and "in flight: version 1" in other.message
    (wrong_abort,) = m.process(AbortUpdate(request_id="a", weight_version=3))
    assert not wrong_abort.success and m.job.stage is Stage.READY
    assert engine.weight_version == 0
    _, done = m.process(CommitUpdate(request_id="c3", weight_version=1))
    assert done.success and engine.weight_version == 1


def test_atomic_needs_a_shadow_update(machine):  # noqa: F811
    m, engine, _ = machine
    (done,) = m.process(atomic(1, load_mode="in_place"))
    assert not done.success and "commit: 'atomic' needs load_mode 'shadow'" in done.message
    assert m.job is None and engine.calls == []
