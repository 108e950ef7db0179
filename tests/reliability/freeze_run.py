"""One freeze case, run and judged: `Freezer` stops a process at a hook and thaws it before
or after the timeout; `run_engine_freeze` is the whole case for a frozen engine (the test
process pushes); the `assert_*` checks are shared by every freeze test.
"""

from __future__ import annotations

import threading
import time

import pytest

from rlsync.config import SyncConfig
from tests.reliability.freeze_cases import (
    ANNOUNCE,
    BEFORE,
    SLACK_S,
    THAW_BEFORE,
    Case,
    Once,
    Rig,
    Timed,
    engine_bound_s,
    hook,
    push_bound_s,
)
from tests.reliability.freeze_checks import Verdict, freeze, settle, thaw, verdict


class Freezer:
    """Freezes one process when called (a `hook` action), and thaws it BEFORE the timeout
    (a timer) or AFTER it (`after_push`, once the push has returned and timeout_s + 0.5 s
    have passed since the freeze)."""

    def __init__(self, pid: int, thaw_when: str, timeout_s: float):
        self.pid, self.thaw_when, self.timeout_s = pid, thaw_when, timeout_s
        self.frozen_at: float | None = None
        self.thawed_at: float | None = None
        self._timer: threading.Timer | None = None

    def __call__(self) -> None:
        freeze(self.pid)
        self.frozen_at = time.monotonic()
        if self.thaw_when == BEFORE:
            self._timer = threading.Timer(THAW_BEFORE * self.timeout_s, self.thaw)
            self._timer.start()

    def thaw(self) -> None:
        if self.thawed_at is None:
            thaw(self.pid)
            self.thawed_at = time.monotonic()

    def after_push(self) -> None:
        """The push has returned: an AFTER thaw now (never sooner than the timeout)."""
        assert self.frozen_at is not None, "the freeze hook never fired: the case tested nothing"
        if self._timer is not None:
            self._timer.join()
        late = self.frozen_at + self.timeout_s + 0.5 - time.monotonic()
        time.sleep(max(late, 0.0))
        self.thaw()

    def close(self) -> None:
        """Never leave the process stopped (a failed case included)."""
        if self._timer is not None:
            self._timer.cancel()
        self.thaw()


def settled_verdicts(rig: Rig, names: list[str], cfg: SyncConfig) -> dict[str, Verdict]:
    """Each engine once its update is over (within its documented bound), judged."""
    bound = engine_bound_s(cfg) + SLACK_S
    out = {}
    for name in names:
        took = settle(rig.engines[name], bound)
        assert took < bound, f"{name}: update still running {took:.1f}s later (bound {bound:.0f}s)"
        out[name] = verdict(rig.engines[name], rig.checkpoints)
    return out


def assert_consistent(verdicts: dict[str, Verdict], when: str) -> None:
    """Every engine serves the checkpoint of the version it reports, or refuses."""
    bad = [f"{n}: {v.short()} ({'; '.join(v.problems)})" for n, v in verdicts.items() if not v.ok]
    assert not bad, f"{when}: " + " | ".join(bad)


def assert_reached(verdicts: dict[str, Verdict], version: int, push: Timed | None = None) -> None:
    """The push of `version` landed, whole, on every engine."""
    assert_consistent(verdicts, f"after the next push (v{version})")
    missed = {n: v.short() for n, v in verdicts.items() if v.version != version}
    why = f"; push: {push.summary()[:300]}" if push is not None else ""
    assert not missed, f"the next push (v{version}) did not reach {missed}{why}"


def judge(rig: Rig, names: list[str], cfg: SyncConfig, when: str) -> dict[str, Verdict]:
    """Settled, consistent, and (atomic) all on one version."""
    verdicts = settled_verdicts(rig, names, cfg)
    assert_consistent(verdicts, when)
    if cfg.commit == "atomic":
        versions = {v.version for v in verdicts.values()}
        assert len(versions) == 1, f"{when}: atomic, yet the engines went apart: {verdicts}"
    return verdicts


def check_frozen_push(push: Timed, case: Case, bound_s: float, names: list[str]) -> None:
    """The push with a frozen engine ended in time; a short freeze cost nothing, and with a
    long one the other engine still got the version (independent)."""
    assert push.seconds < bound_s + SLACK_S, f"push took {push.seconds:.1f}s, bound {bound_s:.0f}s"
    if case.thaw == BEFORE:
        assert push.succeeded() == sorted(names), (
            f"a short freeze failed the push: {push.summary()}"
        )
    elif case.commit == "independent" and len(names) > 1:
        assert names[0] in push.succeeded(), f"the live engine missed it: {push.summary()}"


def run_engine_freeze(
    rig: Rig, case: Case, timeout_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last of the case's engines frozen at its moment of a push from this process,
    thawed before or after the timeout; then every check, and the next push."""
    rig.restore()
    names = rig.names(case.engines)
    cfg = case.sync(timeout_s)
    pusher = rig.pusher(cfg, names)
    freezer = Freezer(rig.engines[names[-1]].process.pid, case.thaw, timeout_s)
    try:
        action = Once(freezer)
        hook(case.moment, action, monkeypatch)
        if case.moment == ANNOUNCE:
            action()
        push = rig.push(pusher)
        freezer.after_push()
        monkeypatch.undo()  # the next push runs unhooked
        check_frozen_push(push, case, push_bound_s(cfg), names)
        judge(rig, names, cfg, f"after the frozen push (v{rig.version})")
        after = rig.push(pusher)
        assert after.seconds < push_bound_s(cfg) + SLACK_S, f"next push took {after.seconds:.1f}s"
        assert_reached(settled_verdicts(rig, names, cfg), rig.version, after)
    finally:
        freezer.close()
        pusher.close()
