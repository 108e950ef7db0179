"""The pusher's commit-or-abort decision (`trainer_side.sync.atomic_commit`) against a fake of the
engines' side: who is told what, who is blamed, and the commit window."""

from __future__ import annotations

import time

import pytest

from rlsync.wire.protocol import AbortUpdate, CommitUpdate, EngineDied, UpdateDone, UpdateReady
from trainer_side.sync.atomic_commit import PUSHER, AtomicRound


class FakeEngines:
    """Records what the round sends; answers each gathered update with an UpdateDone that
    says whether a commit or an abort reached that engine."""

    def __init__(self, unreachable: tuple[str, ...] = ()):
        self.sent: list[tuple[str, type, int]] = []
        self.unreachable = unreachable

    def send(self, msgs):
        for name, msg in msgs.items():
            if name in self.unreachable:
                raise RuntimeError(f"{name}: socket gone")
            self.sent.append((name, type(msg), msg.weight_version))
        return {n: f"rid-{n}" for n in msgs}

    def tell(self, msgs):
        """As EngineSet.tell: an engine whose socket fails does not stop the others."""
        for name, msg in msgs.items():
            try:
                self.send({name: msg})
            except RuntimeError:
                continue

    def gather(self, rids, timeout_s):
        told = {name: kind for name, kind, _ in self.sent}
        out = {}
        for name, rid in rids.items():
            if told.get(name) is CommitUpdate:
                out[name] = UpdateDone(request_id=rid, committed_at=time.time())
            elif told.get(name) is AbortUpdate:
                out[name] = UpdateDone(request_id=rid, success=False, message="aborted")
            else:
                out[name] = EngineDied(request_id=rid, message=f"engine {name} did not answer")
        return out


RIDS = {n: f"u-{n}" for n in ("a", "b", "c")}


def ready(name: str) -> UpdateReady:
    return UpdateReady(request_id=RIDS[name], weight_version=7)


def new_round(engines, since_announce_s: float = 0.0, commit_timeout_s: float = 10.0):
    return AtomicRound(engines, 7, time.monotonic() - since_announce_s, commit_timeout_s, 1.0)


def test_all_ready_in_the_window_commits_everywhere():
    engines = FakeEngines()
    out = new_round(engines).finish(RIDS, {n: ready(n) for n in RIDS}, refused={})
    assert out.committed and out.culprits == {}
    assert engines.sent == [(n, CommitUpdate, 7) for n in RIDS]
    assert all(isinstance(r, UpdateDone) and r.success for r in out.replies.values())


def test_a_refusal_aborts_every_engine_that_accepted():
    engines = FakeEngines()
    first = {"a": ready("a"), "b": ready("b")}
    out = new_round(engines).finish(RIDS, first, refused={"c": "weight_version 7 is not newer"})
    assert not out.committed and out.culprits == {"c": "weight_version 7 is not newer"}
    assert engines.sent == [("a", AbortUpdate, 7), ("b", AbortUpdate, 7)]
    assert [out.replies[n].message for n in ("a", "b")] == ["aborted", "aborted"]


def test_a_failed_or_silent_engine_aborts_and_the_silent_one_is_told_too():
    engines = FakeEngines()
    first = {
        "a": ready("a"),
        "b": UpdateDone(request_id=RIDS["b"], success=False, message="fingerprint mismatch"),
        "c": EngineDied(request_id=RIDS["c"], message="engine c did not answer"),
    }
    out = new_round(engines).finish(RIDS, first, refused={})
    assert out.culprits == {"b": "fingerprint mismatch", "c": "engine c did not answer"}
    # c may still be receiving: it is told to abort; b already ended its update
    assert engines.sent == [("a", AbortUpdate, 7), ("c", AbortUpdate, 7)]
    assert out.replies["b"] is first["b"] and out.replies["c"] is first["c"]


@pytest.mark.parametrize("since_announce_s, commits", [(8.5, True), (9.5, False)])
def test_no_commit_is_sent_once_the_window_has_passed(since_announce_s, commits):
    engines = FakeEngines()
    out = new_round(engines, since_announce_s).finish(RIDS, {n: ready(n) for n in RIDS}, {})
    assert out.committed is commits
    if not commits:
        assert list(out.culprits) == [PUSHER] and "commit window" in out.culprits[PUSHER]
        assert {kind for _, kind, _ in engines.sent} == {AbortUpdate}


def test_a_failed_transfer_aborts_even_when_every_engine_says_ready():
    engines = FakeEngines()
    out = new_round(engines).finish(RIDS, {n: ready(n) for n in RIDS}, {}, "TransportError: x")
    assert out.culprits == {PUSHER: "transfer failed: TransportError: x"}
    assert {kind for _, kind, _ in engines.sent} == {AbortUpdate}


def test_an_engine_unreachable_at_the_commit_is_reported_and_the_others_commit():
    engines = FakeEngines(unreachable=("b",))
    out = new_round(engines).finish(RIDS, {n: ready(n) for n in RIDS}, {})
    assert out.committed and [n for n, _, _ in engines.sent] == ["a", "c"]
    assert out.replies["a"].success and out.replies["c"].success
    assert isinstance(out.replies["b"], EngineDied)  # the pusher names it in the report


def test_an_engine_silent_at_the_announcement_is_told_to_abort_too():
    """It may wake up holding the update: the AbortUpdate waiting behind it in its socket
    makes it drop the update at once instead of holding admission for commit_timeout_s.
    One that refused ended its update already and is not told."""
    engines = FakeEngines()
    refused = {"b": "engine b did not answer", "c": "weight_version 7 is not newer"}
    out = new_round(engines).finish(RIDS, {"a": ready("a")}, refused, silent=["b"])
    assert not out.committed and out.culprits == refused
    assert engines.sent == [("a", AbortUpdate, 7), ("b", AbortUpdate, 7)]
    assert out.replies["a"].message == "aborted"  # the ready one's UpdateDone is collected


def test_nobody_accepting_still_aborts_the_silent_ones():
    engines = FakeEngines()
    refused = {"a": "engine a did not answer", "b": "engine b did not answer"}
    out = new_round(engines).finish(RIDS, {}, refused, silent=["a", "b"])
    assert not out.committed and out.culprits == refused
    assert engines.sent == [("a", AbortUpdate, 7), ("b", AbortUpdate, 7)]
