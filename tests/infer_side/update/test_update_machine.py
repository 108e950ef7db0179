"""The update state machine in-process: a fake engine (real tensors, counted pauses) and a
fake receiver (bytes written through the real WeightWriter, released by the test), so every
transition, failure, cancel and the watchdog run without sockets or processes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from infer_side.update import update_machine
from infer_side.update.update_machine import Stage, UpdateMachine
from rlsync.plan.buckets import plan_buckets
from rlsync.transports.base import Cancelled, Receiver
from rlsync.wire.protocol import (
    GetWeightsFingerprint,
    GetWeightSpecs,
    UpdateAccepted,
    UpdateDone,
    UpdateWeightsFromIPC,
    WeightFingerprints,
    WeightSpecs,
    plan_id_of,
)

SHAPES = {"a": (4, 3), "b": (5,)}


class FakeStore:
    """A weight store of two float32 tensors, with no flat buffer (updates are staged)."""

    flat = None
    store_ref = None

    def __init__(self, fill: float = 0.0):
        self.tensors = {n: torch.full(s, fill) for n, s in SHAPES.items()}
        self.closed = False

    def close(self):
        self.closed = True

    def expected(self):
        return {n: ("float32", tuple(s)) for n, s in SHAPES.items()}

    def validate(self, items, complete=True):
        seen = set()
        for name, dtype, shape in items:
            if name not in SHAPES or dtype != "float32" or tuple(shape) != SHAPES[name]:
                raise ValueError(f"{name}: does not fit")
            seen.add(name)
        if complete and seen != set(SHAPES):
            raise ValueError(f"{sorted(set(SHAPES) - seen)[0]}: missing")

    def hf_views(self):
        return self.tensors

    def fingerprints(self, names=None):
        return {
            n: int(t.sum().item() * 1000)
            for n, t in self.tensors.items()
            if names is None or n in names
        }


class ExposedFakeStore(FakeStore):
    """A store another process could map (it has a flat buffer)."""

    def __init__(self, fill: float = 0.0):
        super().__init__(fill)
        self.flat = torch.zeros(64, dtype=torch.uint8)


class FakeEngine:
    """What UpdatableEngine asks for, recorded."""

    def __init__(self):
        self.weight_version = 0
        self.live = FakeStore(0.0)
        self.paused = None
        self.waiting, self.running = 0, 0
        self.calls: list[str] = []

    def live_weights(self):
        return self.live

    def new_shadow(self):
        self.calls.append("new_shadow")
        return type(self.live)(-1.0)

    def stream_sink(self, store):
        return None

    def apply_weights(self, store):
        self.calls.append("apply")
        self.live = store

    def pause(self, mode):
        self.calls.append(f"pause:{mode}")
        self.paused = mode

    def continue_generation(self):
        self.calls.append("continue")
        self.paused = None

    def paused_mode(self):
        return self.paused

    def counts(self):
        return self.waiting, self.running

    def is_idle(self):
        return self.running == 0

    def flush_kv(self, empty_cache):
        self.calls.append(f"flush:{empty_cache}")


class FakeReceiver(Receiver):
    """Writes `value` into every tensor; between tensors it waits for the test's go-ahead."""

    kind = "ipc"

    def __init__(self):
        self.step = threading.Semaphore(0)
        self.value = 1.0
        self.fail_after: int | None = None
        self.failed_msgs = []
        self.ignore_cancel = False
        self.direct = False
        """Open the store to a writer in another process first (one-copy ipc)."""

    def check(self, msg, plan, weights):
        return 36

    def receive(self, msg, plan, writer):
        if self.direct:
            writer.open_store()
        for i, name in enumerate(SHAPES):
            assert self.step.acquire(timeout=10), "test never released the receiver"
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("peer vanished")
            if self.ignore_cancel:
                writer.views[name].fill_(self.value)  # a write that does not look at cancel
            else:
                writer.write(name, torch.full(SHAPES[name], self.value))

    def failed(self, msg):
        self.failed_msgs.append(msg)

    def release(self, n: int = len(SHAPES)):
        for _ in range(n):
            self.step.release()


@pytest.fixture
def machine():
    engine = FakeEngine()
    m = UpdateMachine(engine)
    m.receivers["ipc"] = receiver = FakeReceiver()
    return m, engine, receiver


PLAN = plan_buckets([(n, "float32", s) for n, s in SHAPES.items()], 1 << 10)


def update(version: int, **kw) -> UpdateWeightsFromIPC:
    kw.setdefault("plan", PLAN)
    return UpdateWeightsFromIPC(
        request_id=f"u{version}",
        weight_version=version,
        plan_id=plan_id_of(PLAN),
        push_id=version,
        **kw,
    )


def run_until_done(m: UpdateMachine, timeout_s: float = 10.0) -> UpdateDone:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for reply in m.poll():
            if isinstance(reply, UpdateDone):
                return reply
        time.sleep(0.002)
    raise AssertionError(f"no UpdateDone; job stage {m.job.stage if m.job else None}")


def values(store: FakeStore) -> dict[str, float]:
    return {n: float(t.unique().item()) for n, t in store.tensors.items()}


# ---------------------------------------------------------------- the happy paths


def test_in_place_waits_for_idle_then_receives_into_live_then_commits(machine):
    m, engine, receiver = machine
    engine.running = 1
    (accepted,) = m.process(update(1))
    assert isinstance(accepted, UpdateAccepted) and accepted.bytes == 36
    assert m.job.stage is Stage.WAITING
    assert m.poll() == [] and m.admission_held and m.job.stage is Stage.WAITING
    engine.running = 0
    m.poll()
    assert m.job.stage is Stage.RECEIVING and m.weights_incomplete
    assert m.incoming_version() == 1
    receiver.release()
    done = run_until_done(m)
    assert done.success and done.weight_version == 1 and done.transport == "ipc"
    assert values(engine.live) == {"a": 1.0, "b": 1.0}
    assert not m.weights_incomplete and not m.admission_held and m.job is None
    assert engine.calls == ["apply", "flush:False"]
    assert done.timings.total_s > 0 and done.timings.load_s > 0


def test_shadow_receives_while_generating_then_swaps_between_steps(machine):
    m, engine, receiver = machine
    engine.running = 2
    m.process(update(1, load_mode="shadow", pause_mode="in_place", torch_empty_cache=True))
    assert m.job.stage is Stage.RECEIVING and not m.weights_incomplete
    assert engine.paused is None  # generation goes on while the shadow fills
    receiver.release()
    done = run_until_done(m)
    assert done.success
    assert engine.calls == ["new_shadow", "pause:in_place", "apply", "flush:True", "continue"]
    assert values(engine.live) == {"a": 1.0, "b": 1.0} and engine.weight_version == 1
    assert values(m.shadow) == {"a": 0.0, "b": 0.0}  # the old live store is the next shadow


# ---------------------------------------------------------------- refusals change nothing


@pytest.mark.parametrize(
    "msg, why",
    [
        (update(0), "not newer"),
        (update(1, plan=plan_buckets([("a", "float32", (4, 3))], 1 << 10)), "b: missing"),
    ],
)
def test_refused_update_changes_nothing(machine, msg, why):
    m, engine, _ = machine
    msg.plan_id = plan_id_of(msg.plan)
    (done,) = m.process(msg)
    assert isinstance(done, UpdateDone) and not done.success and why in done.message
    assert m.job is None and engine.weight_version == 0 and engine.calls == []
    assert values(engine.live) == {"a": 0.0, "b": 0.0}


def test_second_update_is_refused_while_one_is_in_flight(machine):
    m, _, receiver = machine
    m.process(update(1))
    (done,) = m.process(update(2))
    assert not done.success and "version 1 still in progress" in done.message
    receiver.release()
    m.poll()
    assert run_until_done(m).success


# ---------------------------------------------------------------- the plan is sent once


def test_plan_is_kept_by_id_and_an_unknown_id_asks_for_the_plan(machine):
    m, engine, receiver = machine
    (done,) = m.process(update(1, plan=None))
    assert done.unknown_plan and not done.success and m.job is None
    m.process(update(1))
    receiver.release()
    m.poll()
    assert run_until_done(m).success
    (accepted,) = m.process(update(2, plan=None))  # only the id this time
    assert isinstance(accepted, UpdateAccepted)
    receiver.value = 2.0
    receiver.release()
    m.poll()
    assert run_until_done(m).success and values(engine.live) == {"a": 2.0, "b": 2.0}


def test_a_plan_whose_id_does_not_match_its_content_is_refused(machine):
    m, _, _ = machine
    msg = update(1)
    msg.plan_id = "0" * 32
    (done,) = m.process(msg)
    assert not done.success and "does not match" in done.message
    (done,) = m.process(update(1, plan=None))
    assert done.unknown_plan  # nothing was kept


# ---------------------------------------------------------------- failures


def test_in_place_failure_before_any_write_restores_generation(machine):
    m, engine, receiver = machine
    receiver.fail_after = 0
    m.process(update(1))
    m.poll()
    assert m.weights_incomplete
    receiver.release(1)
    done = run_until_done(m)
    assert not done.success and "peer vanished" in done.message
    assert not done.live_touched and not done.weights_incomplete and not m.weights_incomplete
    assert receiver.failed_msgs and engine.weight_version == 0


def test_in_place_failure_after_a_write_keeps_generation_refused(machine):
    m, engine, receiver = machine
    receiver.fail_after = 1
    m.process(update(1))
    m.poll()
    receiver.release()
    done = run_until_done(m)
    assert not done.success and done.live_touched and done.weights_incomplete
    assert m.weights_incomplete and engine.weight_version == 0
    assert values(engine.live) == {"a": 1.0, "b": 0.0}  # why generation stays refused
    receiver.fail_after = None
    m.process(update(2))  # the next whole update repairs it
    m.poll()
    receiver.release()
    assert run_until_done(m).success and not m.weights_incomplete


def test_shadow_failure_leaves_old_weights_serving(machine):
    m, engine, receiver = machine
    receiver.fail_after = 1
    m.process(update(1, load_mode="shadow"))
    receiver.release()
    done = run_until_done(m)
    assert not done.success and not done.live_touched and not m.weights_incomplete
    assert values(engine.live) == {"a": 0.0, "b": 0.0} and "apply" not in engine.calls


def test_not_idle_within_idle_timeout_fails_naming_counts(machine):
    m, engine, _ = machine
    engine.waiting, engine.running = 3, 1
    m.process(update(1, idle_timeout_s=0.05))
    time.sleep(0.06)
    done = run_until_done(m)
    assert not done.success and "waiting=3, running=1" in done.message
    assert not m.admission_held and m.job is None and values(engine.live)["a"] == 0.0


# ---------------------------------------------------------------- cancel and the watchdog


def test_writer_stops_once_cancelled():
    from rlsync.transports.base import WeightWriter

    cancel = threading.Event()
    store = FakeStore()
    writer = WeightWriter(store.hf_views(), cancel)
    writer.write("a", torch.ones(4, 3))
    cancel.set()
    with pytest.raises(Cancelled):
        writer.write("b", torch.ones(5))
    assert values(store) == {"a": 1.0, "b": 0.0} and writer.touched


def test_watchdog_cancels_a_stuck_shadow_receive_and_drops_its_store(machine, monkeypatch):
    """The mixed-bytes defect: a worker the engine gave up on kept writing into the shadow
    store, which the next update then swapped in. Now the worker is cancelled and the store
    it could still write is never used again."""
    monkeypatch.setattr(update_machine, "WORKER_GRACE_S", 0.0)
    m, engine, receiver = machine
    m.process(update(1, load_mode="shadow", timeout_s=0.1, idle_timeout_s=0.0))
    stuck_store, stuck_job = m.shadow, m.job
    done = run_until_done(m)
    assert not done.success and "cancelled" in done.message
    assert m.shadow is None and stuck_job.cancel.is_set()
    receiver.release()  # the zombie wakes up: its writes must not land anywhere we use
    stuck_job.thread.join(5)
    assert not stuck_job.thread.is_alive() and "Cancelled" in stuck_job.worker_error
    assert values(stuck_store) == {"a": -1.0, "b": -1.0}
    receiver.value = 3.0
    m.process(update(2, load_mode="shadow"))
    assert m.shadow is not stuck_store
    receiver.release()
    assert run_until_done(m).success
    assert values(engine.live) == {"a": 3.0, "b": 3.0} and engine.live is not stuck_store


def test_watchdog_on_in_place_blocks_updates_until_the_worker_stops(machine, monkeypatch):
    monkeypatch.setattr(update_machine, "WORKER_GRACE_S", 0.0)
    m, engine, receiver = machine
    receiver.ignore_cancel = True  # a transport wait that cannot be interrupted
    m.process(update(1, timeout_s=0.1, idle_timeout_s=0.0))
    done = run_until_done(m)
    assert not done.success and done.live_touched and m.weights_incomplete
    (refused,) = m.process(update(2))
    assert not refused.success and "still stopping" in refused.message
    receiver.release()
    m.abandoned.thread.join(5)
    receiver.ignore_cancel = False
    m.process(update(2))
    m.poll()
    receiver.release()
    assert run_until_done(m).success and not m.weights_incomplete


# ---------------------------------------------------------------- weight state


def test_fingerprints_and_specs_answer_with_their_own_messages(machine):
    m, _, _ = machine
    (fp,) = m.process(GetWeightsFingerprint(request_id="f", names=["a"]))
    assert isinstance(fp, WeightFingerprints) and list(fp.fingerprints) == ["a"]
    assert fp.weights_incomplete is False and fp.update_in_progress is False
    (specs,) = m.process(GetWeightSpecs(request_id="s"))
    assert isinstance(specs, WeightSpecs)
    assert [(s.name, s.dtype, s.shape) for s in specs.specs] == [
        ("a", "float32", [4, 3]),
        ("b", "float32", [5]),
    ]


def test_a_failure_that_wrote_nothing_keeps_an_earlier_incomplete_state(machine):
    """Weights half-written by an earlier update stay refused when a later update fails
    before its first write (clearing the flag would serve the mix as the old version)."""
    m, engine, receiver = machine
    receiver.fail_after = 1
    m.process(update(1))
    m.poll()
    receiver.release()
    assert not run_until_done(m).success and m.weights_incomplete
    receiver.fail_after = 0
    m.process(update(2))
    m.poll()
    receiver.release(1)
    done = run_until_done(m)
    assert not done.success and not done.live_touched
    assert done.weights_incomplete and m.weights_incomplete


def test_a_load_into_the_model_that_fails_keeps_generation_refused(machine, monkeypatch):
    """A backend that copies the received store into its model (vLLM) may fail mid-load:
    the model may hold part of the update, so generation stays refused until repaired."""
    m, engine, receiver = machine

    def broken(store):
        raise RuntimeError("reload failed")

    monkeypatch.setattr(engine, "apply_weights", broken)
    m.process(update(1, load_mode="shadow"))
    receiver.release()
    done = run_until_done(m)
    assert not done.success and "reload failed" in done.message
    assert done.live_touched and done.weights_incomplete and m.weights_incomplete
    assert engine.weight_version == 0


def test_a_shadow_that_cannot_be_allocated_leaves_no_update_behind(machine, monkeypatch):
    """A refused accept must not leave a job that later receives into the live store."""
    m, engine, _ = machine

    def out_of_memory():
        raise MemoryError("no room for a second copy")

    monkeypatch.setattr(engine, "new_shadow", out_of_memory)
    (done,) = m.process(update(1, load_mode="shadow"))
    assert not done.success and "no room" in done.message
    assert m.job is None and m.poll() == [] and not m.weights_incomplete


def test_idle_timeout_counts_from_the_wait_not_from_the_accept(machine):
    """A shadow receive longer than idle_timeout_s still gets its full wait for idle."""
    m, engine, receiver = machine
    m.process(update(1, load_mode="shadow", idle_timeout_s=0.2))
    time.sleep(0.3)  # the receive takes longer than idle_timeout_s
    engine.running = 1
    receiver.release()
    m.job.done.wait(5)
    assert m.poll() == [] and m.job.stage is Stage.RECEIVED  # waiting for idle, not failed
    engine.running = 0
    assert run_until_done(m).success


@pytest.mark.parametrize("load_mode", ["shadow", "in_place"])
def test_a_failed_direct_update_retires_the_store_a_late_writer_could_reach(machine, load_mode):
    """A pusher allowed to write a store may write it late (stopped, then resumed): after
    the update fails, the engine never computes with that store again."""
    m, engine, receiver = machine
    engine.live = ExposedFakeStore(0.0)
    old_live = engine.live
    receiver.direct, receiver.fail_after = True, 1
    m.process(update(1, load_mode=load_mode, pause_mode="abort"))
    target = m.shadow if load_mode == "shadow" else old_live
    receiver.release()
    done = run_until_done(m)
    assert not done.success and target.closed
    if load_mode == "shadow":
        assert m.shadow is None and engine.live is old_live and not old_live.closed
        assert not m.weights_incomplete
    else:  # refusing already; a fresh store is live until a whole update fills it
        assert engine.live is not old_live and m.weights_incomplete and done.live_touched
    receiver.direct, receiver.fail_after = False, None
    m.process(update(2, load_mode=load_mode, pause_mode="abort"))
    receiver.release()
    assert run_until_done(m).success and not m.weights_incomplete
    assert engine.live.fingerprints() == {"a": 12000, "b": 5000}
