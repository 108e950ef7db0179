"""A trainer process for the freeze and recovery tests: it builds a WeightPusher over the
engines it is given, then pushes two versions, stopping itself (SIGSTOP) at a chosen moment
of the first; the test thaws it (SIGCONT) or SIGKILLs it. Lines on stdout, one each:

    READY                 the pusher is built (engines found, broadcast group formed)
    STOPPING              about to stop itself (the moment came)
    RESULT1 {json}        the first push ended (report or error, seconds)
    RESULT2 {json}        the second push ended
It waits for a line on stdin before each push, so the test decides when each one starts.

    python -m tests.reliability.freeze_pusher_proc '{"endpoints": {...}, "case": {...},
        "timeout_s": 2, "ckpt": DIR, "versions": [v1, v2], "work": DIR}'
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from rlsync.wire.protocol import UpdateWeights
from tests.e2e.sync_helpers import trainer_weights
from tests.reliability.freeze_cases import ANNOUNCE, FIRST, Case, Once, hook
from trainer_side.sync.engine_set import EngineSet
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher


def stop_self() -> None:
    print("STOPPING", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


def hook_announce(action: Once, monkeypatch: pytest.MonkeyPatch) -> None:
    """`action` right after the announcements went out, before any reply is read."""
    send = EngineSet.send

    def send_then(self: EngineSet, msgs):  # noqa: ANN001, ANN202 - EngineSet.send's signature
        rids = send(self, msgs)
        if any(isinstance(m, UpdateWeights) for m in msgs.values()):
            action()
        return rids

    monkeypatch.setattr(EngineSet, "send", send_then)


def hook_first(action: Once, sender: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """`action` once the engines accepted, before the sender moves a byte."""
    for name in ("send", "send_encoded"):
        real = getattr(sender, name)

        def then(self, *args, _real=real, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            action()
            return _real(self, *args, **kw)

        monkeypatch.setattr(sender, name, then)


def push(pusher: WeightPusher, ckpt: str, version: int) -> dict:
    start = time.monotonic()
    try:
        report = pusher.push(trainer_weights(ckpt, version), version)
        out = {"succeeded": report.succeeded, "failed": report.failed, "summary": report.summary()}
    except PushError as exc:
        out = {"succeeded": exc.report.succeeded if exc.report else [], "error": str(exc)}
    out["seconds"] = time.monotonic() - start
    return out


def main() -> int:
    args = json.loads(sys.argv[1])
    case = Case(**args["case"])
    pusher = WeightPusher(
        case.sync(args["timeout_s"]), args["endpoints"], args["work"], connect_timeout_s=20
    )
    patch = pytest.MonkeyPatch()
    action = Once(stop_self)
    if case.moment == ANNOUNCE:
        hook_announce(action, patch)
    elif case.moment == FIRST:
        hook_first(action, type(pusher.sender), patch)
    else:
        hook(case.moment, action, patch)
    print("READY", flush=True)
    try:
        for i, version in enumerate(args["versions"], 1):
            sys.stdin.readline()
            print(f"RESULT{i} " + json.dumps(push(pusher, args["ckpt"], version)), flush=True)
            patch.undo()
    finally:
        pusher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
