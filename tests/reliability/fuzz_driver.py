"""Send hostile cases to a live engine and account for every one of them.

Cases go out in windows over one raw DEALER socket. After each window the driver sends its
own ContinueGeneration (a fuzzed PauseGeneration must not leave later Generates queued) and
waits until the number of final replies equals the number of messages sent: the server
answers every frame it receives exactly once with a final reply (weight updates also send
an interim UpdateAccepted), so a missing reply is a lost frame and a late one a hang.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq

from rlsync.wire.codec import ProtocolError, decode, encode
from rlsync.wire.protocol import ContinueGeneration, EngineDied, Message, failed, is_final
from tests.reliability.fuzz_frames import Case, harmless

WINDOW = 40


@dataclass
class FuzzCounts:
    """What the fuzz sent and what came back."""

    sent: int = 0
    skipped: int = 0
    final_replies: int = 0
    error_replies: int = 0
    ok_replies: int = 0
    accepted_updates: int = 0
    undecodable_replies: int = 0
    by_category: Counter = field(default_factory=Counter)
    ok_by_category: Counter = field(default_factory=Counter)
    errors_by_kind: Counter = field(default_factory=Counter)
    categories: dict[str, str] = field(default_factory=dict)
    """request_id -> category, for frames that decode (their replies can be attributed)."""

    def summary(self) -> dict:
        return {
            "frames_sent": self.sent,
            "skipped": self.skipped,
            "final_replies": self.final_replies,
            "error_replies": self.error_replies,
            "ok_replies": self.ok_replies,
            "accepted_updates": self.accepted_updates,
            "by_category": dict(self.by_category),
            "ok_by_category": dict(self.ok_by_category),
            "top_errors": dict(self.errors_by_kind.most_common(12)),
        }


def fuzz_engine(
    endpoint: str, cases: Iterable[Case], dead_port: int, window_timeout_s: float = 30.0
) -> FuzzCounts:
    """Send every harmless case; raise AssertionError if any window's replies fall short."""
    counts = FuzzCounts()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        batch: list[Case] = []
        for case in cases:
            batch.append(case)
            if len(batch) == WINDOW:
                _window(sock, batch, counts, dead_port, window_timeout_s)
                batch = []
        if batch:
            _window(sock, batch, counts, dead_port, window_timeout_s)
    finally:
        sock.close(linger=0)
    return counts


def _window(
    sock: zmq.Socket, batch: list[Case], counts: FuzzCounts, dead_port: int, timeout_s: float
) -> None:
    expected = 0
    for category, parts in batch:
        if not harmless(parts, dead_port):
            counts.skipped += 1
            continue
        sock.send_multipart(parts)
        _remember(parts, category, counts)
        counts.sent += 1
        counts.by_category[category] += 1
        expected += 1
    sock.send(encode(ContinueGeneration(request_id=f"fuzz-continue-{counts.sent}")))
    expected += 1
    got = _collect(sock, expected, counts, timeout_s)
    assert got == expected, (
        f"window of {len(batch)} cases: {got} final replies, expected "
        f"{expected} (categories {Counter(c for c, _ in batch)})"
    )


def _remember(parts: list[bytes], category: str, counts: FuzzCounts) -> None:
    if len(parts) == 1:
        try:
            counts.categories[decode(parts[0]).request_id] = category
        except ProtocolError:
            pass


def _collect(sock: zmq.Socket, expected: int, counts: FuzzCounts, timeout_s: float) -> int:
    got, deadline = 0, time.monotonic() + timeout_s
    while got < expected and time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        try:
            reply = decode(sock.recv())
        except ProtocolError:
            counts.undecodable_replies += 1
            continue
        if not is_final(reply):
            counts.accepted_updates += 1
            continue
        assert not isinstance(reply, EngineDied), f"the engine died: {reply.message}"
        got += 1
        counts.final_replies += 1
        _classify(reply, counts)
    return got


def _classify(reply: Message, counts: FuzzCounts) -> None:
    error = failed(reply)
    if error is None:
        counts.ok_replies += 1
        counts.ok_by_category[counts.categories.get(reply.request_id, "driver")] += 1
        return
    counts.error_replies += 1
    counts.errors_by_kind[_kind(error)] += 1


def _kind(error: str) -> str:
    """A short label for an error message: its leading words, numbers and quotes dropped."""
    head = (
        error.split(":")[0]
        if not error.startswith("ProtocolError")
        else ":".join(error.split(":")[:2])
    )
    words = [w for w in head.replace("'", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:6])[:80]
