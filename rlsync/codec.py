"""The one codec: protocol dataclasses <-> msgpack frames, validated on decode.

A frame is msgpack of `[type_name, {field: value}]`. Decoding checks the type name, required
and unknown fields, every field's type (from the dataclass annotations) and the ranges in the
field metadata, and raises `ProtocolError` naming `Message.field`. msgpack never runs code and
we never fall back to pickle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

import msgpack

from rlsync import protocol
from rlsync.protocol import Message

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
        raw = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=MAX_FRAME_BYTES, max_str_len=1 << 20)
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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(protocol))


def _build(cls: type, fields: Any, where: str, cap: int, depth: int) -> Any:
    if not isinstance(fields, dict):
        raise ProtocolError(where, f"expected a map of fields, got {type(fields).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known), key=repr)  # keys may mix str and bytes
    if unknown:
        raise ProtocolError(f"{where}.{unknown[0]}", "unknown field")
    hints = _hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name not in fields:
            if name in _required(cls):
                raise ProtocolError(f"{where}.{name}", "required field missing")
            continue
        kwargs[name] = _check(hints[name], fields[name], f"{where}.{name}", f.metadata, cap, depth + 1)
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
            _check(_hints(cls)[f.name], f.default, f.name, f.metadata, MAX_BYTES_FIELD, 0)
        except ProtocolError:
            required.add(f.name)
    return frozenset(required)


def _check(tp: Any, value: Any, where: str, meta: Any, cap: int, depth: int) -> Any:
    """Validate `value` against annotation `tp` and limits `meta`; return the typed value."""
    if depth > MAX_DEPTH:
        raise ProtocolError(where, "nested too deep")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(inner[0], value, where, meta, cap, depth)
    if origin is typing.Literal:
        if value not in args:
            raise ProtocolError(where, f"{value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, cap, depth)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(where, f"expected a list, got {type(value).__name__}")
        _check_len(value, where, meta)
        return [_check(args[0], v, f"{where}[{i}]", {}, cap, depth + 1) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(where, f"expected a map, got {type(value).__name__}")
        _check_len(value, where, meta)
        return {_check(str, k, where, {}, cap, depth): _check_any(v, f"{where}.{k}", cap, depth + 1)
                for k, v in value.items()}
    if tp is Any:
        return _check_any(value, where, cap, depth)
    return _check_scalar(tp, value, where, meta, cap)


def _check_scalar(tp: Any, value: Any, where: str, meta: Any, cap: int) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ProtocolError(where, f"expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(where, f"expected int, got {type(value).__name__}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(where, f"expected float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(where, f"{value} is not finite")
    elif tp is str:
        if not isinstance(value, str):
            raise ProtocolError(where, f"expected str, got {type(value).__name__}")
        _check_len(value, where, meta)
        return value
    elif tp is bytes:
        if not isinstance(value, bytes):
            raise ProtocolError(where, f"expected bytes, got {type(value).__name__}")
        if len(value) > cap:
            raise ProtocolError(where, f"{len(value)} bytes exceeds the cap of {cap}")
        _check_len(value, where, meta)
        return value
    else:
        raise ProtocolError(where, f"unsupported annotation {tp!r}")
    if "ge" in meta and value < meta["ge"]:
        raise ProtocolError(where, f"{value} is below the minimum {meta['ge']}")
    if "le" in meta and value > meta["le"]:
        raise ProtocolError(where, f"{value} is above the maximum {meta['le']}")
    return value


def _check_len(value: Any, where: str, meta: Any) -> None:
    if "max_len" in meta and len(value) > meta["max_len"]:
        raise ProtocolError(where, f"length {len(value)} exceeds {meta['max_len']}")


def _check_any(value: Any, where: str, cap: int, depth: int) -> Any:
    """Free-form payload values: msgpack natives only, bounded in depth and bytes."""
    if depth > MAX_DEPTH:
        raise ProtocolError(where, "nested too deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, bytes):
        if len(value) > cap:
            raise ProtocolError(where, f"{len(value)} bytes exceeds the cap of {cap}")
        return value
    if isinstance(value, list):
        return [_check_any(v, f"{where}[{i}]", cap, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_check(str, k, where, {}, cap, depth): _check_any(v, f"{where}.{k}", cap, depth + 1)
                for k, v in value.items()}
    raise ProtocolError(where, f"unsupported value type {type(value).__name__}")
