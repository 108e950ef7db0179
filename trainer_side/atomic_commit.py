"""The pusher's second phase of an atomic push: commit on every engine, or on none.

    announce (commit="atomic") -> UpdateAccepted -> bytes -> every engine UpdateReady?
        yes, and the commit window is still open -> CommitUpdate to all -> UpdateDone each
        no (a refusal, a failure, a death, a timeout) -> AbortUpdate to every engine that
            accepted -> their UpdateDone (discarded; the old version keeps serving)

The window: an engine discards a ready update `commit_timeout_s` after its UpdateReady, and
every UpdateReady follows the announcement, so a commit sent before `commit_timeout_s -
COMMIT_MARGIN_S` after the announcement finds every engine still holding. An engine that dies
after the commit went out cannot be undone: the others have switched; the report names it.
This module knows only the protocol and the EngineSet; the engines' side is
`infer_side.update_machine`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlsync.config import COMMIT_MARGIN_S
from rlsync.protocol import (
    AbortUpdate,
    CommitUpdate,
    Message,
    UpdateDone,
    UpdateReady,
    failed,
)
from trainer_side.sync_engines import EngineSet

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
    ) -> AtomicOutcome:
        """`first`: each accepting engine's reply after the bytes (UpdateReady or a failure);
        `refused`: engines that refused or did not answer the announcement, with why."""
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
            self._tell(AbortUpdate, [n for n in first if _in_flight(first[n])])
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
        """Send the word to each engine; one that cannot be reached does not stop the rest
        (its missing UpdateDone is reported)."""
        for name in names:
            try:
                self.engines.send({name: kind(weight_version=self.version)})
            except Exception:  # a dead engine's socket: its gather below says so
                continue


def _in_flight(reply: Message) -> bool:
    """Whether an engine may still hold the update: ready, or silent (it may be receiving)."""
    return not isinstance(reply, UpdateDone)


def _why(reply: Message) -> str:
    if isinstance(reply, UpdateDone) or failed(reply) is not None:
        return failed(reply) or "failed"
    return f"answered {type(reply).__name__} instead of UpdateReady"
