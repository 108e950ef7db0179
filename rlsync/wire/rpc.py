"""Calls to an engine over one ZMQ DEALER socket: control calls, pipelined sends, generation.

Used by both sides (the trainer's weight pusher and the engine client), so it knows nothing
about either: it sends protocol messages, pairs replies with calls by `request_id`, and bounds
every wait. Waits poll the socket in short slices so a dead peer (`liveness()` returns False)
raises `EngineDead` within a slice instead of waiting out the timeout.

Thread safety: one lock guards the socket; whichever thread holds it reads every pending
reply into a per-request inbox, so concurrent calls from several threads each get their own.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

import zmq

from rlsync.wire.auth import ClientKeys, secure_client_socket
from rlsync.wire.codec import ProtocolError, decode, encode
from rlsync.wire.endpoints import check_endpoint
from rlsync.wire.protocol import (
    Abort,
    EngineDied,
    Generate,
    GenerateOutput,
    Message,
    failed,
    is_final,
)

log = logging.getLogger(__name__)

SLICE_S = 0.05
"""Longest single poll; liveness is checked between slices."""

M = TypeVar("M", bound=Message)


class RpcTimeout(TimeoutError):
    """No reply within the timeout."""


class EngineDead(RuntimeError):
    """The engine process is gone (liveness check failed or it sent EngineDied)."""


class RpcError(RuntimeError):
    """The engine answered a control call with a failure; the message is the engine's."""

    def __init__(self, msg: Message, reply: Message):
        super().__init__(f"{type(msg).__name__} failed: {failed(reply)}")
        self.reply = reply


class RpcClient:
    """Request/reply client of one engine endpoint."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float,
        liveness: Callable[[], bool] | None = None,
        context: zmq.Context | None = None,
        auth: ClientKeys | None = None,
    ):
        """`auth`: CURVE keys for an engine served with --auth-keys (required for tcp://)."""
        self.endpoint = check_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.liveness = liveness
        self._lock = threading.Lock()
        self._inbox: dict[str, deque[Message]] = {}
        self._loose: dict[str, str] = {}  # id -> type name of messages sent with send()
        self._loose_box: deque[Message] = deque()  # their replies, in arrival order
        self._sock: zmq.Socket | None = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if auth is not None:
            secure_client_socket(self._sock, auth)
        self._sock.connect(self.endpoint)

    # ------------------------------------------------------------ public calls

    def call(self, msg: Message, timeout_s: float | None = None) -> Message:
        """Send a control message and wait for its reply (a failure or not): a Result, or the
        typed reply the request has (EngineInfo for GetInfo, say)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid = self._send(msg, timeout)
        try:
            reply = self._wait_for(rid, _deadline(timeout), msg, timeout)
        finally:
            self.forget(rid)
        if isinstance(reply, GenerateOutput):
            raise ProtocolError(type(reply).__name__, f"not a reply to {type(msg).__name__}")
        return reply

    def call_ok(self, msg: Message, timeout_s: float | None = None) -> Message:
        """`call`, raising RpcError when the engine reports a failure."""
        reply = self.call(msg, timeout_s)
        if failed(reply) is not None:
            raise RpcError(msg, reply)
        return reply

    def send(self, msg: M) -> M:
        """Send without waiting; collect the reply with `recv`. Returns the message as sent
        (with its request_id filled in)."""
        msg = _with_id(msg)
        self._send(msg, self.timeout_s, self._loose_box)
        return msg

    def recv(self, timeout_s: float | None = None) -> Message:
        """The next reply to any message sent with `send`."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = _deadline(timeout)
        while True:
            reply = self._pop_loose()
            if reply is not None:
                return _raise_if_dead(reply)
            if not self._loose:
                raise RuntimeError("recv: nothing was sent with send() that still awaits a reply")
            self._pump(deadline, ", ".join(sorted(set(self._loose.values()))), timeout)

    def generate(
        self, requests: Iterable[Generate], timeout_s: float | None = None
    ) -> Iterator[GenerateOutput]:
        """Send every request, then yield outputs in the order they finish (stream chunks as
        they come). `timeout_s` bounds the whole batch; on timeout or early exit the unfinished
        requests are aborted. A Result for a request (rejected) is yielded as an error output.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = _deadline(timeout)
        waiting: set[str] = set()
        box: deque[Message] = deque()
        try:
            for req in requests:
                waiting.add(self._send(req, timeout, box))
            while waiting:
                yield from self._take_outputs(box, waiting)
                if waiting:
                    self._pump(deadline, f"Generate x{len(waiting)}", timeout)
        finally:
            self._abandon(waiting)

    def forget(self, request_id: str) -> None:
        """Give up on a request: drop its inbox, its `send` bookkeeping and any of its replies
        not yet taken by `recv`; replies that arrive for it later are dropped on arrival.

        Call it for every request sent with `send` whose final reply you will not wait for
        (a timeout, an engine given up on). Without it the client keeps an entry per such
        request for its whole life: unbounded growth against a flaky engine, and a stale
        reply still handed to a later `recv`. Idempotent; unknown ids are ignored.
        """
        with self._lock:
            self._inbox.pop(request_id, None)
            if self._loose.pop(request_id, None) is not None:
                kept = [r for r in self._loose_box if r.request_id != request_id]
                self._loose_box.clear()
                self._loose_box.extend(kept)

    def pending(self) -> int:
        """How many requests this client still keeps bookkeeping for (awaiting a reply or
        not yet forgotten); bounded when every give-up path calls `forget`."""
        with self._lock:
            return len(self._inbox.keys() | self._loose.keys())

    def close(self) -> None:
        """Close the socket at once (linger 0: unsent messages are dropped) and forget every
        request still awaiting a reply: none can come."""
        with self._lock:
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            self._inbox.clear()
            self._loose.clear()
            self._loose_box.clear()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _send(
        self, msg: Message, timeout: float, box: deque[Message] | None = None, *, track: bool = True
    ) -> str:
        """Send one message. Its replies are filed, in arrival order, into `box` (shared by
        the requests of one generate or by every `send`), or a fresh inbox; with track=False
        they are dropped on arrival."""
        msg = _with_id(msg)
        frame = encode(msg)
        with self._lock:
            sock = self._open_socket()
            if box is self._loose_box:
                self._loose[msg.request_id] = type(msg).__name__
            if track:
                self._inbox[msg.request_id] = deque() if box is None else box
            try:
                if not sock.poll(int(timeout * 1000), zmq.POLLOUT):
                    raise RpcTimeout(
                        f"{self.endpoint}: could not send {type(msg).__name__} within {timeout:g} s"
                    )
                sock.send(frame, zmq.NOBLOCK)
            except BaseException:  # never sent: nothing will answer it, keep no entry for it
                self._inbox.pop(msg.request_id, None)
                self._loose.pop(msg.request_id, None)
                raise
        return msg.request_id

    def _wait_for(self, rid: str, deadline: float, msg: Message, timeout: float) -> Message:
        while True:
            replies = self._take(rid)
            if replies:
                return _raise_if_dead(replies[0])
            self._pump(deadline, type(msg).__name__, timeout)

    def _pump(self, deadline: float, what: str, timeout: float) -> None:
        """Wait one slice for replies and file them; raise on timeout or a dead peer.

        A dead peer's last replies may still be in flight, so after liveness fails we keep
        reading while slices bring data, and raise EngineDead at the first empty slice. Past
        the deadline, replies already received still count (one non-blocking read).
        """
        alive = self.liveness is None or self.liveness()
        remaining = deadline - time.monotonic()
        if remaining <= -SLICE_S:  # replies for others kept coming past our deadline
            raise RpcTimeout(f"{self.endpoint}: no reply to {what} within {timeout:g} s")
        with self._lock:
            sock = self._open_socket()
            wait_ms = int(min(remaining, SLICE_S) * 1000) + 1 if remaining > 0 else 0
            got = bool(sock.poll(wait_ms, zmq.POLLIN))
            if got:
                self._drain(sock)
        if remaining <= 0 and not got:  # past the deadline: replies already here still count
            raise RpcTimeout(f"{self.endpoint}: no reply to {what} within {timeout:g} s")
        if not alive and not got:
            raise EngineDead(
                f"{self.endpoint}: engine is gone (liveness check failed) while waiting for {what}"
            )

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode(frame)
            except ProtocolError as exc:
                log.warning("%s: dropping an undecodable reply: %s", self.endpoint, exc)
                continue
            box = self._inbox.get(reply.request_id)
            if box is None:
                log.debug(
                    "%s: dropping %s for unknown request_id %r",
                    self.endpoint,
                    type(reply).__name__,
                    reply.request_id,
                )
                continue
            box.append(reply)

    def _take(self, rid: str) -> list[Message]:
        with self._lock:
            box = self._inbox.get(rid)
            replies = list(box) if box else []
            if box:
                box.clear()
            return replies

    def _take_outputs(self, box: deque[Message], waiting: set[str]) -> list[GenerateOutput]:
        """Outputs that arrived in `box`, in order; finished requests leave `waiting`."""
        with self._lock:
            replies = list(box)
            box.clear()
        outputs = [_as_output(reply) for reply in replies]
        for out in outputs:
            if out.finished:
                waiting.discard(out.request_id)
                self.forget(out.request_id)
        return outputs

    def _pop_loose(self) -> Message | None:
        with self._lock:
            if not self._loose_box:
                return None
            reply = self._loose_box.popleft()
            if is_final(reply):
                self._loose.pop(reply.request_id, None)
                self._inbox.pop(reply.request_id, None)
            return reply

    def _abandon(self, rids: set[str]) -> None:
        """Stop waiting for unfinished generations and ask the engine to abort them; the
        Abort's own Result and any late outputs are dropped on arrival."""
        for rid in rids:
            self.forget(rid)
            try:
                self._send(Abort(target_id=rid), SLICE_S, track=False)
            except (RpcTimeout, zmq.ZMQError, RuntimeError):
                log.debug("%s: could not abort %s", self.endpoint, rid)

    def _open_socket(self) -> zmq.Socket:
        if self._sock is None:
            raise RuntimeError(f"{self.endpoint}: client is closed")
        return self._sock


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _with_id(msg: M) -> M:
    if msg.request_id:
        return msg
    return replace(msg, request_id=uuid.uuid4().hex)


def _raise_if_dead(reply: Message) -> Message:
    if isinstance(reply, EngineDied):
        raise EngineDead(reply.message)
    return reply


def _as_output(reply: Message) -> GenerateOutput:
    _raise_if_dead(reply)
    if isinstance(reply, GenerateOutput):
        return reply
    message = failed(reply) or f"unexpected {type(reply).__name__}"
    return GenerateOutput(
        request_id=reply.request_id,
        finished=True,
        finish_reason="abort",
        error=message or "request rejected",
    )
