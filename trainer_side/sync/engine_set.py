"""The engines a pusher serves: one RPC client each, bounded fan-out calls, and who is dead.

Every wait shares one deadline across engines, so N engines never cost N timeouts. An engine
that does not answer is reported by name and given up on: it is left out of the next
announcements and pinged at once, without waiting; before every push `revive` reads those
pings (a few milliseconds at most), so an engine that was only frozen or slow comes back at
the first push after it wakes, and one that stays silent costs the pushes nothing. A request given up on is
forgotten by its client, and a late reply to it (a thawed engine answers everything it was
sent while frozen) is dropped, never taken for the reply to a later request.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping

import zmq

from rlsync.model_config import ModelConfig
from rlsync.wire.auth import ClientKeys
from rlsync.wire.endpoints import ipc_path
from rlsync.wire.protocol import (
    EngineDied,
    EngineInfo,
    GetInfo,
    GetWeightsFingerprint,
    GetWeightSpecs,
    Message,
    WeightFingerprints,
    WeightSpecs,
    failed,
)
from rlsync.wire.rpc import EngineDead, RpcClient, RpcTimeout

PING_TIMEOUT_S = 3.0
"""How long `find_dead` waits for its pings (after a broken broadcast)."""
REVIVE_WAIT_S = 0.05
"""How long `revive` waits, in all, for pings it has not had an answer to: they were sent
when their engines were given up on, so one that woke since has answered long ago."""


class EngineSet:
    """RPC clients by engine name, plus the names found dead."""

    def __init__(
        self, endpoints: Mapping[str, str], timeout_s: float, auth: ClientKeys | None = None
    ):
        if not endpoints:
            raise ValueError("endpoints: at least one engine is needed")
        self.clients: dict[str, RpcClient] = {}
        try:
            for name, ep in endpoints.items():
                self.clients[name] = RpcClient(ep, timeout_s=timeout_s, auth=auth)
        except BaseException:
            self.close()
            raise
        self.dead: set[str] = set()
        """Engines given up on: left out of announcements until `revive` hears from them."""
        self.pings: dict[str, str] = {}
        """engine given up on -> the request id of its outstanding ping."""
        self.model_cfg: ModelConfig | None = None
        """The engines' model architecture, read by `discover`."""
        self.layout: dict[str, int] | None = None
        """name -> byte offset in every engine's store, when all engines publish the same
        layout (their stores can be written in place); else None. Read by `discover`."""

    def discover(self, timeout_s: float) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Read every engine's model config and weight specs (name -> dtype, shape); the
        engines must all serve the same model. Raises ValueError naming the engine."""
        specs, layouts = None, []
        for name, reply in self.call_all(GetWeightSpecs, timeout_s).items():
            if not isinstance(reply, WeightSpecs):
                raise ValueError(f"engine {name}: cannot read its weight specs: {failed(reply)}")
            mine = {s.name: (s.dtype, tuple(s.shape)) for s in reply.specs}
            if specs is not None and mine != specs:
                raise ValueError(f"engine {name}: serves a different model than the other engines")
            specs = mine
            layouts.append(_layout(reply))
        same = all(layout == layouts[0] for layout in layouts)
        self.layout = layouts[0] if layouts and same else None
        first = self.call_all(GetInfo, timeout_s)[self.names[0]]
        if not isinstance(first, EngineInfo):
            raise ValueError(f"engine {self.names[0]}: GetInfo failed: {failed(first)}")
        self.model_cfg = ModelConfig(**first.model)
        return specs or {}

    @property
    def names(self) -> list[str]:
        return list(self.clients)

    def live(self) -> list[str]:
        return [n for n in self.clients if n not in self.dead]

    def index(self, name: str) -> int:
        return self.names.index(name)

    def send(self, msgs: Mapping[str, Message]) -> dict[str, str]:
        """Send one message per engine without waiting; returns name -> request_id."""
        return {name: self.clients[name].send(msg).request_id for name, msg in msgs.items()}

    def tell(self, msgs: Mapping[str, Message]) -> None:
        """Send one message per engine and wait for no reply (CommitUpdate, AbortUpdate): the
        request is forgotten at once, so its reply, whenever it comes, is dropped. An engine
        whose socket cannot take the message does not stop the others."""
        for name, msg in msgs.items():
            client = self.clients[name]
            try:
                client.forget(client.send(msg).request_id)
            except (RpcTimeout, RuntimeError, zmq.ZMQError):  # a closed or stuck socket
                continue  # (its missing reply is reported where one is awaited)

    def gather(self, rids: Mapping[str, str], timeout_s: float) -> dict[str, Message]:
        """The next reply to each request id, all within one shared deadline. A silent or dead
        engine gets an EngineDied saying so."""
        deadline = time.monotonic() + timeout_s
        return {name: self._next_reply(name, rid, deadline) for name, rid in rids.items()}

    def call_all(self, make: Callable[[], Message], timeout_s: float) -> dict[str, Message]:
        """Send `make()` to every live engine, then gather the replies."""
        return self.gather(self.send({n: make() for n in self.live()}), timeout_s)

    def find_dead(self, timeout_s: float = PING_TIMEOUT_S) -> list[str]:
        """Ping every live engine and wait; those that do not answer are given up on
        (`give_up`) and returned. Only where the pusher must know now (a broken broadcast
        group is re-formed without them)."""
        found = [
            n for n, r in self.call_all(GetInfo, timeout_s).items() if isinstance(r, EngineDied)
        ]
        self.give_up(found)
        return sorted(found)

    def give_up(self, names: list[str]) -> None:
        """Leave `names` out of the next announcements and ping each at once, without waiting:
        `revive` reads the answer before a later push. So a frozen or slow engine costs the
        pushes after the one it missed nothing, and one that wakes is found at the next push."""
        self.dead.update(names)
        for name in names:
            self._ping(name)

    def revive(self, wait_s: float = REVIVE_WAIT_S) -> list[str]:
        """Read the pings of the engines given up on (sent when they were, or after their
        last answer), waiting at most `wait_s` in all; each that answered with no update in
        flight is live again, and is returned. One still busy with an update it was sent
        before it went silent (the pusher aborted it) is pinged again; one that has not
        answered keeps its ping outstanding and stays out. An ipc engine whose socket nobody
        listens on any more (its process is gone) costs nothing."""
        deadline = time.monotonic() + wait_s
        back: list[str] = []
        for name in sorted(self.dead):
            if _gone(self.clients[name].endpoint):
                self._drop_ping(name)
                continue
            self._ping(name)
            reply = self._ping_reply(name, deadline)
            if isinstance(reply, WeightFingerprints) and not reply.update_in_progress:
                back.append(name)
            elif reply is not None:
                self._ping(name)  # answered, but busy: ask again, read it next push
        self.dead.difference_update(back)
        return back

    def _ping(self, name: str) -> None:
        """One ping outstanding per engine given up on (so a long freeze keeps one entry)."""
        if name in self.pings:
            return
        client = self.clients[name]
        try:
            self.pings[name] = client.send(GetWeightsFingerprint(names=[])).request_id
        except (RpcTimeout, RuntimeError, zmq.ZMQError):  # a stuck or closed socket
            pass  # tried again at the next revive

    def _ping_reply(self, name: str, deadline: float) -> Message | None:
        """The answer to `name`'s outstanding ping, if it came by `deadline` (None: not yet,
        and the ping stays outstanding). Replies to older requests are skipped."""
        rid, client = self.pings.get(name), self.clients[name]
        while rid is not None:
            try:
                reply = client.recv(max(deadline - time.monotonic(), 0.0))
            except RpcTimeout:
                return None
            except (EngineDead, RuntimeError):
                self._drop_ping(name)
                return None
            if reply.request_id == rid:
                del self.pings[name]
                return reply
        return None

    def _drop_ping(self, name: str) -> None:
        rid = self.pings.pop(name, None)
        if rid is not None:
            self.clients[name].forget(rid)

    def _next_reply(self, name: str, rid: str, deadline: float) -> Message:
        """The reply to `rid`; replies to older requests are skipped (a thawed engine answers
        what it was sent while frozen). Giving up forgets `rid`, so the client keeps nothing
        for it and its late reply is dropped on arrival."""
        client = self.clients[name]
        while True:
            left = deadline - time.monotonic()
            try:
                reply = client.recv(max(left, 0.0))
            except (RpcTimeout, EngineDead, RuntimeError) as exc:
                client.forget(rid)
                return EngineDied(request_id=rid, message=f"engine {name} did not answer: {exc}")
            if reply.request_id == rid:
                return reply

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _gone(endpoint: str) -> bool:
    """Whether nobody listens on an ipc:// endpoint any more: its socket file is missing or
    refuses a connection (the process that bound it is gone). A frozen process still
    accepts (the kernel queues the connection), so it is pinged. tcp://: never known."""
    path = ipc_path(endpoint)
    if path is None:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        probe.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except OSError:  # a full backlog, a timeout: someone may still be there
        return False
    finally:
        probe.close()
    return False


def _layout(reply: WeightSpecs) -> dict[str, int] | None:
    """name -> store offset, when the engine publishes a row-major layout for every tensor."""
    if not reply.store_bytes or any(s.offset is None for s in reply.specs):
        return None
    if any(s.strides != _row_major(s.shape) for s in reply.specs):
        return None  # a writer copies whole contiguous tensors: anything else stays staged
    return {s.name: s.offset for s in reply.specs if s.offset is not None}


def _row_major(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return strides[::-1]
