"""The pusher's second phase of an atomic push: commit on every engine, or on none.

    announce (commit="atomic") -> UpdateAccepted -> bytes -> every engine UpdateReady?
        yes, and the commit window is still open -> CommitUpdate to all -> UpdateDone each
        no (a refusal, a failure, a death, a timeout) -> AbortUpdate to every engine that
            was announced to and has not ended its update (ready, still receiving, or
            silent at the announcement) -> the UpdateDone of the ready ones (discarded; the
            old version keeps serving)

Why the silent ones too: an engine frozen at the announcement reads the update when it wakes
and would accept it, receive nothing it can use, and hold admission (refusing every other
update) until its own `commit_timeout_s`. The AbortUpdate waits in its socket right behind
the update, so it drops the update at once instead.

The window: an engine discards a ready update `commit_timeout_s` after its UpdateReady, and
every UpdateReady follows the announcement, so a commit sent before `commit_timeout_s -
COMMIT_MARGIN_S` after the announcement finds every engine still holding. An engine that dies
after the commit went out cannot be undone: the others have switched; the report names it.
This module knows only the protocol and the EngineSet; the engines' side is
`infer_side.update.update_machine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from rlsync.config import COMMIT_MARGIN_S
from rlsync.wire.protocol import (
    AbortUpdate,
    CommitUpdate,
    Message,
    UpdateDone,
    UpdateReady,
    failed,
)
from trainer_side.sync.engine_set import EngineSet
from trainer_side.sync.push_report import PushReport

PUSHER = "(pusher)"
"""The culprit's name when the pusher itself stopped the commit (its window passed, or the
transfer failed with every engine still answering)."""


@dataclass
class AtomicOutcome:
    """What each engine ended with, and why the version did not land (when it did not)."""

    replies: dict[str, Message] = field(default_factory=dict)
    """engine -> its last reply (UpdateDone, or an EngineDied when it did not answer)."""
    committed: bool = False
    culprits: dict[str, str] = field(default_factory=dict)
    """engine -> why it stopped the commit (empty when committed)."""

    def record_into(self, report: PushReport) -> list[str]:
        """Each engine's outcome into `report`; returns those that switched. Committed: each
        engine's UpdateDone (one missing means it died after the commit went out: the others
        switched). Aborted: the culprits' reasons, then the others'."""
        report.aborted_because = self.culprits
        blame = "; ".join(f"{n}: {why}" for n, why in sorted(self.culprits.items()))
        switched = []
        for name, reply in self.replies.items():
            why = failed(reply)
            ok = self.committed and why is None
            if ok:
                switched.append(name)
                message = "ok"
            elif self.committed:
                message = f"no switch confirmed after CommitUpdate (the others switched): {why}"
            elif name in self.culprits:
                message = self.culprits[name]
            else:
                message = f"aborted, nothing switched ({blame}): {why}"
            report.record(name, ok, message, reply if isinstance(reply, UpdateDone) else None)
        return switched


@dataclass
class AtomicRound:
    """One atomic push after the bytes were sent: decide, tell every engine, collect."""

    engines: EngineSet
    version: int
    announced_at: float
    """time.monotonic() when the announcement went out."""
    commit_timeout_s: float
    timeout_s: float

    def finish(
        self,
        rids: dict[str, str],
        first: dict[str, Message],
        refused: dict[str, str],
        transfer_error: str = "",
        *,
        silent: Iterable[str] = (),
    ) -> AtomicOutcome:
        """`first`: each accepting engine's reply after the bytes (UpdateReady or a failure);
        `refused`: engines that refused or did not answer the announcement, with why;
        `silent`: those of them that did not answer at all (they may hold the update)."""
        ready = [n for n, r in first.items() if isinstance(r, UpdateReady)]
        culprits = dict(refused)
        culprits.update({n: _why(r) for n, r in first.items() if n not in ready})
        if not culprits and transfer_error:
            culprits[PUSHER] = f"transfer failed: {transfer_error}"
        if not culprits and not self.window_open():
            culprits[PUSHER] = (
                f"every engine was ready only {self._since_announce():.1f}s after the "
                f"announcement, past the commit window ({self.commit_timeout_s:g}s - "
                f"{COMMIT_MARGIN_S:g}s)"
            )
        out = AtomicOutcome(replies={n: r for n, r in first.items() if n not in ready})
        if culprits:
            out.culprits = culprits
            holding = [n for n in first if _in_flight(first[n])]
            self._tell(AbortUpdate, holding + [n for n in silent if n not in first])
        else:
            out.committed = True
            self._tell(CommitUpdate, ready)
        out.replies.update(self.engines.gather({n: rids[n] for n in ready}, self.timeout_s))
        return out

    def window_open(self) -> bool:
        return self._since_announce() < self.commit_timeout_s - COMMIT_MARGIN_S

    def _since_announce(self) -> float:
        return time.monotonic() - self.announced_at

    def _tell(self, kind: type[CommitUpdate] | type[AbortUpdate], names: list[str]) -> None:
        """Send the word to each engine, waiting for no reply (`EngineSet.tell`: the reply
        is dropped, the client keeps nothing for it); one that cannot be reached does not
        stop the rest (its missing UpdateDone is reported)."""
        self.engines.tell({name: kind(weight_version=self.version) for name in names})


def _in_flight(reply: Message) -> bool:
    """Whether an engine may still hold the update: ready, or silent (it may be receiving)."""
    return not isinstance(reply, UpdateDone)


def _why(reply: Message) -> str:
    if isinstance(reply, UpdateDone) or failed(reply) is not None:
        return failed(reply) or "failed"
    return f"answered {type(reply).__name__} instead of UpdateReady"
