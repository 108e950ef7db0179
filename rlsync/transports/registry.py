"""The one registry of transports: kind -> the module holding both halves.

Adding a transport is one module (a `Sender` and a `Receiver` subclass of
`rlsync.transports.base`, plus an UpdateWeights* message in `rlsync.wire.protocol` whose
`transport` names the kind) and one line in `MODULES`. Modules are imported on first use,
so a CPU-only install never loads CUDA code it does not need.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rlsync.transports.base import Receiver, Sender
from rlsync.wire.protocol import TRANSPORT_KINDS, Message

MODULES: dict[str, str] = {
    "broadcast": "rlsync.transports.broadcast",
    "ipc": "rlsync.transports.ipc",
    "disk": "rlsync.transports.disk",
}
assert tuple(MODULES) == TRANSPORT_KINDS, "one registry line per protocol.TransportKind"


def _module(kind: str) -> ModuleType:
    if kind not in MODULES:
        raise ValueError(f"transport: {kind!r} is not one of {list(MODULES)}")
    return importlib.import_module(MODULES[kind])


def sender_class(kind: str) -> type[Sender]:
    return _module(kind).Sender


def receiver_class(kind: str) -> type[Receiver]:
    return _module(kind).Receiver


def control_owner(msg: Message) -> str | None:
    """The kind whose receiver answers this transport-specific control message, if any."""
    for kind in MODULES:
        if isinstance(msg, receiver_class(kind).control_messages):
            return kind
    return None
