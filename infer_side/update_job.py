"""One weight update in flight on an engine: its request, its stage, its timings.

A job is plain data; `infer_side.weight_sync` moves it through its stages. The receive runs
on a worker thread that only touches the job and the target weights, so the engine's loop
thread can keep answering (and, in shadow mode, keep generating) while bytes arrive.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rlsync.protocol import Message, Result


@dataclass
class UpdateJob:
    """Stages: waiting (for idle or the pause) -> receiving (worker thread) -> received ->
    committed or failed. `paused` records whether this job paused generation, so only the
    job that paused it resumes it."""

    msg: Any
    kind: str
    nbytes: int
    started: float = field(default_factory=time.perf_counter)
    stage: str = "waiting"
    error: str = ""
    paused: bool = False
    block_started: float | None = None
    """When generation stopped for this job (pause, hold or weights-incomplete)."""
    timings: dict[str, float] = field(default_factory=lambda: {"recv_s": 0.0, "load_s": 0.0})
    thread: threading.Thread | None = None
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def version(self) -> int:
        return self.msg.weight_version

    def waited_s(self) -> float:
        return time.perf_counter() - self.started

    def start_worker(self, target: Any) -> None:
        """Run `target(job)` on a daemon thread; the stage becomes received or failed."""
        self.stage = "receiving"

        def run() -> None:
            try:
                target(self)
                self.stage = "received"
            except Exception as exc:  # reported to the pusher, never kills the engine loop
                self.error = f"{type(exc).__name__}: {exc}"
                self.stage = "failed"
            finally:
                self.done_event.set()

        self.thread = threading.Thread(target=run, name=f"weights-v{self.version}", daemon=True)
        self.thread.start()

    def result_payload(self, weight_version: int) -> dict[str, Any]:
        pause_ms = 0.0
        if self.block_started is not None:
            pause_ms = (time.perf_counter() - self.block_started) * 1e3
        return {"stage": "done", "weight_version": weight_version, "bytes": self.nbytes,
                "kind": self.kind, "total_s": self.waited_s(), "pause_ms": pause_ms, **self.timings}


def reply(msg: Message, ok: bool, text: str, **payload: Any) -> Result:
    """The Result answering `msg`."""
    return Result(request_id=msg.request_id, success=ok, message=text, payload=payload)
