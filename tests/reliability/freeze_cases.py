"""The freeze cases: which process is frozen, at which moment of a push, and for how long;
the documented bounds a push and an engine's update must keep; and `Rig`, the engines a
test module shares, brought back to one known version before every case.

Moments (the hooks run in the process that pushes, once per push):
    ANNOUNCE  before the announcement is answered (the frozen engine never reads it in time)
    FIRST     every engine accepted, no byte sent yet (a pusher process only)
    BUCKET0   mid-transfer: bucket 0 is out, bucket 1 not yet (ipc, broadcast)
    READY     atomic: every engine answered UpdateReady, the commit is not sent yet
Thaw: AFTER the pusher's timeout (the frozen process comes back late), or BEFORE it (a
pause shorter than timeout_s must cost nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import rlsync.transports.broadcast as broadcast
import rlsync.transports.ipc as ipc
from infer_side.process.client import EngineClient
from infer_side.update.update_machine import WORKER_GRACE_S
from rlsync.config import SyncConfig
from rlsync.transports.broadcast_group import BroadcastGroup
from tests.reliability.freeze_checks import Checkpoints, settle, verdict
from trainer_side.sync.atomic_commit import AtomicRound
from trainer_side.sync.engine_set import PING_TIMEOUT_S
from trainer_side.sync.push_report import PushError, PushReport
from trainer_side.sync.pusher import WeightPusher

ANNOUNCE = "before-it-answers-the-announcement"
FIRST = "before-the-first-bucket"
BUCKET0 = "after-bucket-0"
READY = "between-ready-and-commit"
AFTER, BEFORE = "after-the-timeout", "before-the-timeout"
SLACK_S = 5.0
"""Added to every documented bound: a loaded 2-core machine, never a speed goal."""
THAW_BEFORE = 0.35
"""A BEFORE thaw comes this share of timeout_s after the freeze."""


@dataclass(frozen=True)
class Case:
    """One freeze: `engines` engines behind one pusher, the last of them (or the pusher,
    or a trainer rank) frozen at `moment`, thawed `thaw`."""

    transport: str
    load_mode: str
    commit: str = "independent"
    moment: str = ANNOUNCE
    thaw: str = AFTER
    engines: int = 2
    one_copy: bool = True

    @property
    def setup(self) -> str:
        """ "2-engines-ipc-shadow-atomic": who pushes through what."""
        path = self.transport if self.one_copy or self.transport != "ipc" else "ipc-staged"
        many = "s" if self.engines > 1 else ""
        return f"{self.engines}-engine{many}-{path}-{self.load_mode}-{self.commit}"

    @property
    def id(self) -> str:
        return f"{self.setup}-frozen-{self.moment}-thawed-{self.thaw}"

    def sync(self, timeout_s: float, **kw: object) -> SyncConfig:
        """The case's config: small buckets (several per push), a short idle wait, and an
        atomic hold of 3 x timeout_s (an engine told nothing lets go soon)."""
        atomic = self.commit == "atomic"
        return SyncConfig(
            transport=self.transport,
            load_mode=self.load_mode,
            commit=self.commit,
            one_copy=self.one_copy,
            bucket_mb=0.02,
            timeout_s=timeout_s,
            idle_timeout_s=kw.pop("idle_timeout_s", 2.0),
            commit_timeout_s=kw.pop("commit_timeout_s", 3 * timeout_s if atomic else None),
            **kw,
        )


def param(case: Case, slow: bool = False, label: str | None = None) -> object:
    """A pytest param of `case`, its id a sentence (`label`, default `case.id`)."""
    marks = [pytest.mark.slow] if slow else []
    return pytest.param(case, id=label or case.id, marks=marks)


def push_bound_s(cfg: SyncConfig) -> float:
    """One push's documented bound (docs/RELIABILITY.md, the wait table): accepts within
    timeout_s, a dead-engine ping, a reader without progress evicted after timeout_s, the
    engines' done within 2 x timeout_s; atomic: commit confirmations (timeout_s) and the
    idle wait; broadcast: a rebuild (rendezvous, timeout_s) and one repeat."""
    t = cfg.timeout_s
    once = 4 * t + PING_TIMEOUT_S
    if cfg.commit == "atomic":
        once += t + cfg.idle_timeout_s
    return 2 * once + t if cfg.transport == "broadcast" else once


def engine_bound_s(cfg: SyncConfig) -> float:
    """How long an engine's update may run at most: its watchdog (2 x timeout_s +
    idle_timeout_s + grace); atomic: plus holding a ready update for the commit."""
    limit = 2 * cfg.timeout_s + cfg.idle_timeout_s + WORKER_GRACE_S
    return limit + (cfg.commit_wait_s if cfg.commit == "atomic" else 0.0)


class Once:
    """`action` run by the first caller only (hooks may fire on several threads)."""

    def __init__(self, action: Callable[[], None]):
        self.action, self.done, self.lock = action, False, threading.Lock()
        self.at = 0.0

    def __call__(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done, self.at = True, time.monotonic()
        self.action()


def hook(moment: str, action: Once, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the pushes of this process run `action` at `moment` (ANNOUNCE: the caller runs
    it before pushing, or `hook_announce` does in a pusher process)."""
    if moment == BUCKET0:
        _hook_second_bucket(action, monkeypatch)
    elif moment == READY:
        finish = AtomicRound.finish

        def ready_then(self: AtomicRound, *args: object, **kw: object):  # noqa: ANN202
            action()
            return finish(self, *args, **kw)

        monkeypatch.setattr(AtomicRound, "finish", ready_then)


def _hook_second_bucket(action: Once, monkeypatch: pytest.MonkeyPatch) -> None:
    """`action` once bucket 0 is out and before bucket 1 is written (ipc: packed into a
    store or the staging buffer; broadcast: posted), after a moment for the engines to
    take bucket 0."""
    pack, seen = ipc.pack_bucket, []

    def pack_then(bucket, tensors, out):  # noqa: ANN001, ANN202 - pack_bucket's signature
        if not any(b is bucket for b in seen):
            seen.append(bucket)
        if len(seen) == 2:
            time.sleep(0.2)
            action()
        return pack(bucket, tensors, out)

    monkeypatch.setattr(ipc, "pack_bucket", pack_then)
    post, posts = BroadcastGroup.broadcast_async, [0]
    send = broadcast.send_buckets

    def post_then(self: BroadcastGroup, tensor, timeout_s):  # noqa: ANN001, ANN202
        posts[0] += 1
        if posts[0] == 2:
            time.sleep(0.2)
            action()
        return post(self, tensor, timeout_s)

    def send_counting(*args: object, **kw: object):  # noqa: ANN202 - counts this push only
        posts[0] = 0
        monkeypatch.setattr(BroadcastGroup, "broadcast_async", post_then)
        try:
            return send(*args, **kw)
        finally:
            monkeypatch.setattr(BroadcastGroup, "broadcast_async", post)

    monkeypatch.setattr(broadcast, "send_buckets", send_counting)


@dataclass
class Timed:
    """One push: how long it took and its report (or the PushError's text)."""

    seconds: float
    report: PushReport | None
    error: str = ""

    def succeeded(self) -> list[str]:
        return self.report.succeeded if self.report is not None else []

    def summary(self) -> str:
        return self.error or (self.report.summary() if self.report else "")


class Rig:
    """Engines by name, the checkpoints of every version pushed, a version counter that
    only grows. `launch(name)` starts a replacement for an engine that no longer takes a push."""

    def __init__(
        self,
        engines: dict[str, EngineClient],
        checkpoints: Checkpoints,
        work: Path,
        launch: Callable[[str], EngineClient],
    ):
        self.engines, self.checkpoints, self.work, self.launch = engines, checkpoints, work, launch
        self.version = max(e.info().weight_version for e in engines.values())
        self._dirs = 0

    def names(self, n: int) -> list[str]:
        return list(self.engines)[:n]

    def pusher(self, cfg: SyncConfig, names: list[str]) -> WeightPusher:
        self._dirs += 1
        endpoints = {n: self.engines[n].endpoint for n in names}
        return WeightPusher(cfg, endpoints, self.work / f"push{self._dirs}", connect_timeout_s=10)

    def push(self, pusher: WeightPusher) -> Timed:
        """Push the next version (its tensors are trainer_weights(ckpt, version))."""
        self.version += 1
        tensors = self.checkpoints.tensors(self.version)
        start = time.monotonic()
        try:
            report = pusher.push(tensors, self.version)
        except PushError as exc:
            return Timed(time.monotonic() - start, exc.report, f"PushError: {exc}")
        return Timed(time.monotonic() - start, report)

    def reserve(self, n: int) -> list[int]:
        """The next `n` versions, for a push another process makes."""
        versions = [self.version + i for i in range(1, n + 1)]
        for v in versions:
            self.checkpoints.tensors(v)
        self.version = versions[-1]
        return versions

    def restore(self) -> int:
        """Every engine whole on one new version (a full ipc push each; an engine that does
        not take it is replaced); returns that version."""
        self.version += 1
        for name in list(self.engines):
            if not self._restore_one(name):
                self.engines[name].close()
                self.engines[name] = self.launch(name)
                assert self._restore_one(name), f"{name}: a fresh engine refused a full push"
        return self.version

    def _restore_one(self, name: str) -> bool:
        cfg = SyncConfig(transport="ipc", bucket_mb=0.02, timeout_s=10)
        try:
            settle(self.engines[name], 30.0)  # a late update of the last case may still run
            pusher = self.pusher(cfg, [name])
        except Exception:
            return False
        try:
            report = pusher.push(self.checkpoints.tensors(self.version), self.version)
            seen = verdict(self.engines[name], self.checkpoints)
            return report.failed == [] and seen.ok and seen.version == self.version
        except Exception:
            return False
        finally:
            pusher.close()
