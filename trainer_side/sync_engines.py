"""The engines a pusher serves: one RPC client each, bounded fan-out calls, and who is dead.

Every wait shares one deadline across engines, so N engines never cost N timeouts. An engine
that does not answer is reported by name; it is never waited on again until it answers a ping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from rlsync.auth import ClientKeys
from rlsync.model_config import ModelConfig
from rlsync.protocol import (
    EngineDied,
    EngineInfo,
    GetInfo,
    GetWeightSpecs,
    Message,
    WeightSpecs,
    failed,
)
from rlsync.rpc import EngineDead, RpcClient, RpcTimeout

PING_TIMEOUT_S = 3.0


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

    def gather(self, rids: Mapping[str, str], timeout_s: float) -> dict[str, Message]:
        """The next reply to each request id, all within one shared deadline. A silent or dead
        engine gets an EngineDied saying so."""
        deadline = time.monotonic() + timeout_s
        return {name: self._next_reply(name, rid, deadline) for name, rid in rids.items()}

    def call_all(self, make: Callable[[], Message], timeout_s: float) -> dict[str, Message]:
        """Send `make()` to every live engine, then gather the replies."""
        return self.gather(self.send({n: make() for n in self.live()}), timeout_s)

    def find_dead(self, timeout_s: float = PING_TIMEOUT_S) -> list[str]:
        """Ping every live engine; those that do not answer are marked dead and returned."""
        found = [
            n for n, r in self.call_all(GetInfo, timeout_s).items() if isinstance(r, EngineDied)
        ]
        self.dead.update(found)
        return sorted(found)

    def _next_reply(self, name: str, rid: str, deadline: float) -> Message:
        client = self.clients[name]
        while True:
            left = deadline - time.monotonic()
            try:
                reply = client.recv(max(left, 0.0))
            except (RpcTimeout, EngineDead, RuntimeError) as exc:
                return EngineDied(request_id=rid, message=f"engine {name} did not answer: {exc}")
            if reply.request_id == rid:
                return reply

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


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
