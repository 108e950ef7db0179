"""The one codec: protocol dataclasses <-> msgpack frames, validated on decode.

A frame is msgpack of `[type_name, {field: value}]`. Decoding checks the type name, required
and unknown fields, every field's type (from the dataclass annotations, through the one
validator in `rlsync.wire.annotations`) and the ranges in the field metadata, and raises
`ProtocolError` naming `Message.field`. msgpack never runs code and we never fall back to
pickle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import msgpack

from rlsync.wire import annotations, protocol
from rlsync.wire.protocol import Message

MAX_FRAME_BYTES = 64 << 20
MAX_BYTES_FIELD = 1 << 20
MAX_DEPTH = 16


class ProtocolError(ValueError):
    """A frame that is not a valid message; `where` names the message and field."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where


def encode(msg: Message) -> bytes:
    """Serialize a protocol message to one msgpack frame."""
    if type(msg).__name__ not in protocol.MESSAGE_TYPES:
        raise ProtocolError(type(msg).__name__, "not a protocol message")
    return msgpack.packb([type(msg).__name__, _to_plain(msg)], use_bin_type=True)


def decode(frame: bytes, max_bytes_field: int = MAX_BYTES_FIELD) -> Message:
    """Parse and validate one frame; any defect raises ProtocolError, nothing else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame", f"expected bytes, got {type(frame).__name__}")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("frame", f"{len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        # bin length is capped per field below (so the error names the field); the frame
        # size already bounds what msgpack can allocate.
        raw = msgpack.unpackb(
            bytes(frame),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_FRAME_BYTES,
            max_str_len=1 << 20,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("frame", f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)):
        raise ProtocolError("frame", "expected [type_name, fields]")
    name, fields = raw
    cls = protocol.MESSAGE_TYPES.get(name)
    if cls is None:
        raise ProtocolError("frame", f"unknown message type {name[:64]!r}")
    return _build(cls, fields, name, max_bytes_field, 0)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=8)
def _rules(cap: int) -> annotations.Rules:
    """Wire rules: ProtocolError, types named (never echoed), bytes capped, depth bounded."""
    return annotations.Rules(
        error=ProtocolError,
        catch=(ProtocolError,),
        bytes_cap=cap,
        max_depth=MAX_DEPTH,
        build=lambda cls, value, where, depth: _build(cls, value, where, cap, depth),
    )


def _build(cls: type, fields: Any, where: str, cap: int, depth: int) -> Any:
    if not isinstance(fields, dict):
        raise ProtocolError(where, f"expected a map of fields, got {type(fields).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known), key=repr)  # keys may mix str and bytes
    if unknown:
        raise ProtocolError(f"{where}.{unknown[0]}", "unknown field")
    hints = annotations.field_hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name not in fields:
            if name in _required(cls):
                raise ProtocolError(f"{where}.{name}", "required field missing")
            continue
        kwargs[name] = annotations.check(
            hints[name], fields[name], f"{where}.{name}", _rules(cap), f.metadata, depth + 1
        )
    return cls(**kwargs)


@functools.cache
def _required(cls: type) -> frozenset[str]:
    """Fields a frame must carry: those without a default, or whose default is not itself a
    valid value (e.g. a str field defaulting to None, a port defaulting to 0 below its minimum)."""
    required = set()
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            continue
        if f.default is dataclasses.MISSING:
            required.add(f.name)
            continue
        try:
            annotations.check(
                annotations.field_hints(cls)[f.name],
                f.default,
                f.name,
                _rules(MAX_BYTES_FIELD),
                f.metadata,
            )
        except ProtocolError:
            required.add(f.name)
    return frozenset(required)
