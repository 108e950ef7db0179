"""What one push did, engine by engine: the value a WeightPusher returns and logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class PushError(RuntimeError):
    """A push that could not start (bad input: nothing was sent) or reached no engine."""

    def __init__(self, message: str, report: PushReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class EngineOutcome:
    """One engine's answer to one push."""

    ok: bool
    message: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class PushReport:
    """Per-engine outcomes plus totals. `failed` names every engine that did not get it."""

    version: int
    transport: str
    engines: dict[str, EngineOutcome] = field(default_factory=dict)
    transfer_error: str = ""
    transfer_s: float = 0.0
    bytes: int = 0
    seconds: float = 0.0

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
    def engine_pause_ms(self) -> float:
        """Longest time any engine stopped generating for this push."""
        return max((o.payload.get("pause_ms", 0.0) for o in self.engines.values() if o.ok), default=0.0)

    def record(self, name: str, ok: bool, message: str, payload: dict[str, Any] | None = None) -> None:
        self.engines[name] = EngineOutcome(ok, message, dict(payload or {}))

    def finish(self, nbytes: int, seconds: float) -> None:
        self.bytes, self.seconds = nbytes, seconds

    def summary(self) -> str:
        parts = [f"{n}: {'ok' if o.ok else o.message}" for n, o in sorted(self.engines.items())]
        if self.transfer_error:
            parts.append(f"transfer: {self.transfer_error}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "transport": self.transport, "bytes": self.bytes,
                "seconds": self.seconds, "gbps": self.gbps, "engine_pause_ms": self.engine_pause_ms,
                "failed": self.failed, "transfer_error": self.transfer_error,
                "engines": {n: {"ok": o.ok, "message": o.message, **o.payload}
                            for n, o in self.engines.items()}}
