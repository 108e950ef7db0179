"""Rollout batches of the RL loop: the ones in flight, and the weight versions of the done ones.

With `staleness: k` the loop keeps up to k batches submitted ahead of the one it trains on
(`RolloutQueue`): batch s+k goes to the engines before the trainer trains on batch s, so the
engines generate while the trainer trains and pushes. Batches are submitted, and so their
prompts drawn, in step order, whatever k is: a run's prompts do not depend on k.

Which engines get a batch (`EngineRoster`): those that hold the version the trainer pushed
last. An engine a push missed (frozen, slow, or dead) sits out; the pusher pings it before
every later push and brings it back with a full push (`PushReport.revived`), and from then
on it gets batches again.

The version helpers read `GenerateOutput.version_spans` (which version produced which
tokens). Knows nothing about Ray beyond holding its ObjectRefs, and nothing about PPO.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlsync.wire.protocol import GenerateOutput, token_versions


@dataclass
class PendingBatch:
    """One step's rollouts, submitted to the engines (engine name -> ObjectRef)."""

    step: int
    prompts: list[list[int]]
    calls: dict[str, Any]


class RolloutQueue:
    """The batches submitted ahead, in step order. `submit(step)` makes one batch's calls."""

    def __init__(self, submit: Callable[[int], PendingBatch], ahead: int) -> None:
        self.submit, self.ahead = submit, ahead
        self.pending: deque[PendingBatch] = deque()
        self.next_step = 0

    def take(self, step: int, last_step: int) -> PendingBatch:
        """Batch `step`, after submitting every batch up to step + ahead (never past
        `last_step`, so nothing is left running when the run ends). Batches of steps before
        `step` are abandoned; a step asked for again is submitted again."""
        while self.pending and self.pending[0].step < step:
            self.pending.popleft()
        if not self.pending or self.pending[0].step != step:
            self.pending.clear()
            self.next_step = step
        upto = max(step, min(step + self.ahead, last_step))
        while self.next_step <= upto:
            self.pending.append(self.submit(self.next_step))
            self.next_step += 1
        return self.pending.popleft()


class EngineRoster:
    """The engines that hold the last pushed version, and those a push missed ("behind")."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.behind: set[str] = set()

    def in_use(self) -> list[str]:
        """The engines to deal the next batch to, in their order."""
        return [n for n in self.names if n not in self.behind]

    def after_push(self, report: Mapping[str, Any]) -> None:
        """A push report (`PushReport.to_dict()`): the engines it failed on fall behind (an
        engine on an older version would serve stale rollouts); those it reached, revived
        ones included, are in use again."""
        reached = {n for n, o in report["engines"].items() if o["ok"]}
        self.behind = (self.behind | set(report["failed"])) - reached


def reached_any(report: Mapping[str, Any]) -> bool:
    """Whether a push report says some engine got the version."""
    return any(o["ok"] for o in report["engines"].values())


def output_token_versions(out: GenerateOutput) -> list[int]:
    """The version of each output token: from its spans, or (an output whose spans do not
    cover its tokens) its oldest version for every token, the conservative reading."""
    versions = token_versions(out.version_spans)
    if len(versions) == len(out.output_ids):
        return versions
    return [min(out.weight_version, out.min_weight_version)] * len(out.output_ids)


def oldest_version(out: GenerateOutput) -> int:
    """The version of the sample's oldest token (the one staleness is judged by)."""
    return min(out.weight_version, out.min_weight_version, *output_token_versions(out))


def version_stats(outputs: Sequence[GenerateOutput]) -> dict[str, int]:
    """Versions in a batch: how many distinct versions produced its tokens, the oldest and
    newest, and how many samples mix versions (an update landed mid-request)."""
    per_sample = [set(output_token_versions(o)) or {oldest_version(o)} for o in outputs]
    seen = set().union(*per_sample)
    return {
        "versions_per_batch": len(seen),
        "newest_version": max(seen),
        "mixed_samples": sum(len(v) > 1 for v in per_sample),
    }
