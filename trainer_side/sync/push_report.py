"""What one push did, engine by engine: the value a WeightPusher returns and logs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlsync.wire.protocol import UpdateDone


class PushError(RuntimeError):
    """A push that could not start (bad input: nothing was sent) or reached no engine."""

    def __init__(self, message: str, report: PushReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class EngineOutcome:
    """One engine's answer to one push: its UpdateDone, when it sent one."""

    ok: bool
    message: str
    done: UpdateDone | None = None


@dataclass
class PushReport:
    """Per-engine outcomes plus totals. `failed` names every engine that did not get it."""

    version: int
    transport: str
    engines: dict[str, EngineOutcome] = field(default_factory=dict)
    transfer_error: str = ""
    transfer_s: float = 0.0
    """Moving the bytes (the sender's `send`)."""
    bytes: int = 0
    seconds: float = 0.0
    plan_sent: bool = False
    """Whether any engine got the whole plan (else only its id travelled)."""
    delta: str = ""
    """Delta mode only: "delta", or "full: <why>" (`trainer_side.sync.delta_push`)."""
    wire_bytes: int = 0
    """Delta mode only: payload bytes sent (headers included); `bytes` is the model's size."""
    encode_s: float = 0.0
    """Delta mode only: time spent encoding (overlaps the transfer)."""
    changed_fraction: float = 0.0
    """Delta mode only: the share of units that differ from the base (exact in buckets sent
    sparse, the sample's estimate in buckets sent whole; 1.0 for a full push)."""
    commit: str = "independent"
    """independent, or atomic (every engine switched to `version`, or none did)."""
    aborted_because: dict[str, str] = field(default_factory=dict)
    """atomic, not committed: engine -> why it stopped the commit ("(pusher)": the pusher)."""
    revived: list[str] = field(default_factory=list)
    """Engines given up on in an earlier push that answered the ping before this one: they
    were announced this push again, in full (`EngineSet.revive`)."""

    @property
    def failed(self) -> list[str]:
        return sorted(n for n, o in self.engines.items() if not o.ok)

    @property
    def succeeded(self) -> list[str]:
        return sorted(n for n, o in self.engines.items() if o.ok)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def control_s(self) -> float:
        """Everything that is not byte transfer: planning, announce, accept, commit."""
        return max(self.seconds - self.transfer_s, 0.0)

    @property
    def engine_pause_ms(self) -> float:
        """Longest time any engine stopped generating for this push."""
        return max(
            (o.done.timings.pause_ms for o in self.engines.values() if o.ok and o.done is not None),
            default=0.0,
        )

    @property
    def commit_skew_s(self) -> float | None:
        """Last minus first engine switch (their `committed_at` wall clocks), over the
        engines that switched; None with fewer than two."""
        times = [
            o.done.committed_at
            for o in self.engines.values()
            if o.ok and o.done is not None and o.done.committed_at > 0
        ]
        return max(times) - min(times) if len(times) > 1 else None

    def record(self, name: str, ok: bool, message: str, done: UpdateDone | None = None) -> None:
        self.engines[name] = EngineOutcome(ok, message, done)

    def finish(self, nbytes: int, seconds: float) -> None:
        self.bytes, self.seconds = nbytes, seconds

    def summary(self) -> str:
        parts = [f"{n}: {'ok' if o.ok else o.message}" for n, o in sorted(self.engines.items())]
        if self.transfer_error:
            parts.append(f"transfer: {self.transfer_error}")
        if self.aborted_because:
            parts.append(f"atomic commit aborted by {', '.join(sorted(self.aborted_because))}")
        if self.revived:
            parts.append(f"back after a missed push (sent in full): {', '.join(self.revived)}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "transport": self.transport,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "transfer_s": self.transfer_s,
            "control_s": self.control_s,
            "gbps": self.gbps,
            "engine_pause_ms": self.engine_pause_ms,
            "failed": self.failed,
            "transfer_error": self.transfer_error,
            "plan_sent": self.plan_sent,
            "delta": self.delta,
            "wire_bytes": self.wire_bytes,
            "encode_s": self.encode_s,
            "changed_fraction": self.changed_fraction,
            "commit": self.commit,
            "commit_skew_s": self.commit_skew_s,
            "aborted_because": dict(self.aborted_because),
            "revived": list(self.revived),
            "engines": {n: _outcome_dict(o) for n, o in self.engines.items()},
        }


def _outcome_dict(o: EngineOutcome) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": o.ok, "message": o.message}
    if o.done is not None:
        out.update(
            weight_version=o.done.weight_version,
            bytes=o.done.bytes,
            weights_incomplete=o.done.weights_incomplete,
            committed_at=o.done.committed_at,
            **dataclasses.asdict(o.done.timings),
        )
    return out
