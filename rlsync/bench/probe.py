"""The engine-pause probe: a streaming generate on a live engine, timed token by token.

Start it, let a few tokens arrive (the normal inter-token gap), run a push, let two more
tokens arrive, stop it. The longest gap among the tokens around the push is what a user of
the engine saw as the pause. The probe talks to the engine through its own client on its own
thread; stopping it abandons the request (the client aborts it on the engine).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from infer_side.process.client import connect
from rlsync.wire.protocol import SamplingParams

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
MAX_NEW_TOKENS = 3000
"""Long enough to outlast any push here; the stream is aborted once the push is measured.
The engine reserves KV for all of it, so its pool must hold prompt + this per probe."""


@dataclass
class Gaps:
    """Inter-token gaps around one push, in milliseconds."""

    normal_ms: float
    """Median gap before the push started (the first gap, which holds the prefill, excluded)."""
    max_ms: float
    """Longest gap that overlaps the push."""
    tokens: int
    during: int = 0
    """Tokens that arrived while the push ran: 0 means the stream stood still throughout."""


class StreamProbe:
    """One streaming generate on `endpoint`, with the arrival time of every chunk."""

    def __init__(
        self, endpoint: str, *, timeout_s: float = 120.0, max_new_tokens: int = MAX_NEW_TOKENS
    ):
        self.endpoint, self.timeout_s, self.max_new_tokens = endpoint, timeout_s, max_new_tokens
        self.times: list[float] = []
        self.error = ""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pause-probe", daemon=True)

    def start(self) -> StreamProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        client = connect(self.endpoint, timeout_s=self.timeout_s)
        try:
            sampling = SamplingParams(max_new_tokens=self.max_new_tokens)
            for _, chunk in client.generate_stream([PROMPT], sampling, timeout_s=self.timeout_s):
                self._record(time.perf_counter(), chunk.error)
                if self._stop.is_set() or chunk.finished:
                    break  # leaving the generator aborts the request on the engine
        except Exception as exc:  # reported by wait_tokens/stop, never lost
            self._record(None, f"{type(exc).__name__}: {exc}")
        finally:
            client.close()
            with self._cond:
                self._cond.notify_all()

    def _record(self, t: float | None, error: str) -> None:
        with self._cond:
            if t is not None and not error:
                self.times.append(t)
            if error:
                self.error = error
            self._cond.notify_all()

    def wait_tokens(self, n: int, timeout_s: float | None = None) -> None:
        """Block until `n` tokens have arrived; raises if the stream failed or timed out."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._cond:
            while len(self.times) < n:
                if self.error:
                    raise RuntimeError(f"pause probe on {self.endpoint}: {self.error}")
                if not self._thread.is_alive() and self._thread.ident is not None:
                    raise RuntimeError(f"pause probe on {self.endpoint}: stream ended early")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"pause probe on {self.endpoint}: {len(self.times)} of "
                        f"{n} tokens after {timeout_s or self.timeout_s:.0f}s"
                    )
                self._cond.wait(min(left, 0.5))

    def count(self) -> int:
        with self._cond:
            return len(self.times)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the next token and wait (bounded) for the thread to finish."""
        self._stop.set()
        self._thread.join(timeout_s)

    def gaps(self, start: float, end: float) -> Gaps:
        return token_gaps(self.times, start, end)


def token_gaps(times: Sequence[float], start: float, end: float) -> Gaps:
    """Gaps of arrival `times` (perf_counter seconds) around a push that ran [start, end]."""
    pairs = list(zip(times[:-1], times[1:], strict=True))
    before = [b - a for a, b in pairs[1:] if b <= start]
    during = [b - a for a, b in pairs if b > start and a < end]
    if not before or not during:
        raise ValueError(
            f"pause probe: {len(before)} gaps before and {len(during)} during "
            "the push; need at least one of each"
        )
    return Gaps(
        normal_ms=statistics.median(before) * 1e3,
        max_ms=max(during) * 1e3,
        tokens=len(times),
        during=sum(1 for t in times if start < t < end),
    )
