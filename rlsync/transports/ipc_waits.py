"""The waits of the ipc protocol (drawn in `rlsync.transports.ipc`): the sender waiting on
its engines' counters (`await_engines`), and one engine following the sender through one
push (`PushFollower`). Each side writes only its own words of the control segment
(`control.Control`) and reads the other's; nothing here knows tensors or buffers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from rlsync.transports import TransferStats, TransportError, TransportTimeout, base
from rlsync.transports.control import Backoff, Control, fence, seq, seq_push

SENDER_CHECK_S = 0.2
"""How often a waiting engine checks that the sender still lives (its control segment's
flock): a SIGKILLed pusher fails the receive at once, not after `timeout_s`."""
OPEN_SLACK_S = 1.0
"""A direct push starts once every engine named in it opened its store or was evicted for not
opening within `timeout_s`; an engine that opened waits that long plus this (the sender's
polling and the fences around the eviction) before it gives up on the start."""


def await_engines(
    control: Control,
    live: set[int],
    target: int,
    push_id: int,
    stats: TransferStats,
    timeout_s: float,
    counter: Callable[[int], int] | None = None,
) -> None:
    """Wait until every live engine's counter (default: consumed) reaches `target`. An engine
    whose counter has not moved for `timeout_s`, or that declined push `push_id` (it failed
    before taking its part and said so), is evicted (left behind: removed from `live`, listed
    in `stats.timed_out_engines`) and the others go on."""
    counter = counter or control.consumed
    t0 = time.perf_counter()
    pending = {e: (counter(e), t0) for e in live}
    backoff = Backoff()
    while pending:
        now = time.perf_counter()
        for e, (last, since) in list(pending.items()):
            value = counter(e)
            if value >= target:
                del pending[e]
            elif control.declined(e) == push_id + 1:
                del pending[e]
                evict(control, e, push_id, live, stats)
            elif value != last:
                pending[e] = (value, now)
            elif now - since > timeout_s:
                del pending[e]
                evict(control, e, push_id, live, stats)
        if pending:
            backoff.pause()
    stats.add("wait", time.perf_counter() - t0)


def evict(
    control: Control, engine: int, push_id: int, live: set[int], stats: TransferStats
) -> None:
    """Leave `engine` behind in push `push_id`; visible to it before anything else is written."""
    control.evict(engine, push_id)
    fence()
    live.discard(engine)
    stats.timed_out_engines.append(engine)


def name_members(control: Control, push_id: int, engines: Iterable[int]) -> None:
    """Write who takes part in push `push_id` (member(e) = push_id + 1), fenced before the
    sender's next word: an engine not named here commits nothing of this push."""
    for e in engines:
        control.set_member(e, push_id)
    fence()


def store_writable(control: Control, engine: int, push_id: int) -> bool:
    """Whether another writer of push `push_id` (a sharded trainer's rank > 0) may write
    `engine`'s store now: named in the push, opened its store for it, neither evicted nor
    declined. The sender evicts only before the push starts (ready = seq(p, 0)) and after
    every writer reported its last bucket, so a writer that checks this before each bucket
    never writes a store after the sender gave up on its engine and let it go on; an engine
    that declines later had opened its store, and discards a store it handed out."""
    p = push_id + 1
    return (
        control.member(engine) == p
        and control.opened(engine) == seq(push_id, 0)
        and control.evicted(engine) != p
        and control.declined(engine) != p
    )


class PushFollower:
    """Engine `engine`'s reading of push `push_id` in the control segment: each wait is bounded,
    stops early when `cancel` is set or the sender is gone (checked every `SENDER_CHECK_S`),
    and every check raises, naming the engine, the push and what it waited for, once the
    engine must not go on (see `check`)."""

    def __init__(
        self,
        control: Control,
        engine: int,
        push_id: int,
        cancel: threading.Event | None = None,
    ):
        self.control, self.engine, self.push_id, self.cancel = control, engine, push_id, cancel

    def wait_named(self, timeout_s: float, stats: TransferStats) -> None:
        """Until the sender names this engine a member of the push (or starts it without
        this engine: then `check` raises). A direct receive opens its store only after this."""
        p = self.push_id
        self._wait(
            lambda: self.control.member(self.engine) == p + 1 or self.control.ready() >= seq(p, 0),
            timeout_s,
            "the start",
            stats,
            "not named in it",
        )

    def wait_started(self, timeout_s: float, stats: TransferStats) -> None:
        """Until the sender has started the push (ready reaches seq(push, 0))."""
        target = seq(self.push_id, 0)
        self._wait(
            lambda: self.control.ready() >= target, timeout_s, "the start", stats, "not started"
        )

    def wait_bucket(self, g: int, timeout_s: float, stats: TransferStats) -> None:
        """Until bucket g is ready; on return its bytes are home (direct) or in its region."""
        target = seq(self.push_id, g + 1)
        self._wait(lambda: self.control.ready() >= target, timeout_s, f"bucket {g}", stats)

    def check(self, what: str) -> None:
        """Raise unless this engine may go on with the push: the sender aborted it, evicted
        this engine (it timed out waiting for it, or the engine declined), moved on to a later
        push, or started this push without naming this engine (it accepted too late, e.g. it
        was frozen: the counters it sees were advanced for the others, not for it)."""
        c, e, p = self.control, self.engine, self.push_id
        if c.aborted() == p + 1:
            raise TransportError(
                f"ipc engine {e}: push {p} aborted by the sender (waiting on {what})"
            )
        if c.evicted(e) == p + 1:
            raise TransportTimeout(
                f"ipc engine {e}: evicted from push {p} at {what}: the sender timed out waiting for it"
            )
        on = seq_push(c.ready())
        if on > p:
            raise TransportError(f"ipc engine {e}: push {p} {what}: the sender is on push {on}")
        if on == p:
            fence()  # the member words were written before ready reached this push
            if c.member(e) != p + 1:
                raise TransportError(
                    f"engine {e} is not taking part in push {p}: the sender started it "
                    f"without this engine (it accepted too late); nothing of it is committed"
                )

    def _wait(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        what: str,
        stats: TransferStats,
        late: str = "",
    ) -> None:
        """Poll until `done`; `late` says what a timeout means (default: "<what> not ready")."""
        t0, backoff = time.perf_counter(), Backoff()
        next_look = t0
        while not done():
            self.check(what)
            if time.perf_counter() >= next_look:
                next_look = time.perf_counter() + SENDER_CHECK_S
                self._check_sender(what)
            if self.cancel is not None and self.cancel.is_set():
                raise base.Cancelled(f"ipc receive cancelled waiting for {what}")
            if time.perf_counter() - t0 > timeout_s:
                raise TransportTimeout(
                    f"ipc engine {self.engine}: push {self.push_id} {late or what + ' not ready'}"
                    f" after {timeout_s:.1f}s (sender pid {self.control.sender_pid})"
                )
            backoff.pause()
        fence()  # what the sender wrote before its counter is visible from here on
        self.check(what)
        stats.add("wait", time.perf_counter() - t0)

    def _check_sender(self, what: str) -> None:
        if not self.control.sender_alive():
            raise TransportError(
                f"ipc engine {self.engine}: push {self.push_id}: the sender (pid "
                f"{self.control.sender_pid}) is gone (waiting on {what})"
            )
