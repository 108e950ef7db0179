"""Property tests for the codec: hostile input only ever raises ProtocolError, and every value
the protocol's own limits allow survives a round trip.

Strategies for valid messages are derived from the dataclasses' annotations and field
metadata, so a limit in `rlsync.wire.protocol` that the codec enforces differently shows up here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsync.wire import protocol as p
from rlsync.wire.codec import ProtocolError, decode, encode

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=40)  # big nested values: fewer, each covers a lot
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
NAMES = sorted(p.MESSAGE_TYPES)
FIELD_NAMES = sorted({f.name for cls in p.MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})


def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError as exc:
        assert exc.where
        return
    assert type(msg).__name__ in p.MESSAGE_TYPES


# ---------------------------------------------------------------- hostile input

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_only_raise_protocol_error(frame):
    _decode_or_protocol_error(frame)


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_only_raises_protocol_error(value):
    _decode_or_protocol_error(msgpack.packb(value, use_bin_type=True))


@FEW
@given(
    st.sampled_from(NAMES),
    st.dictionaries(
        st.sampled_from(FIELD_NAMES) | st.text(max_size=6) | st.binary(max_size=4),
        msgpack_values,
        max_size=6,
    ),
)
def test_message_shaped_msgpack_only_raises_protocol_error(name, fields):
    _decode_or_protocol_error(msgpack.packb([name, fields], use_bin_type=True))


@FUZZ
@given(st.data())
def test_corrupted_valid_frames_only_raise_protocol_error(data):
    cls = data.draw(st.sampled_from([p.MESSAGE_TYPES[n] for n in NAMES]))
    frame = bytearray(encode(data.draw(_message(cls))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    _decode_or_protocol_error(bytes(frame))


# ---------------------------------------------------------------- valid messages


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(p))


payload_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, UINT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _value(tp: Any, meta: Any) -> st.SearchStrategy:
    """Any value of annotation `tp` that the field limits in `meta` allow."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    length = min(meta.get("max_len", 6), 6)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([st.none() if a is type(None) else _value(a, meta) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if dataclasses.is_dataclass(tp):
        return _message(tp)
    if origin is list:
        return st.lists(_value(args[0], {}), max_size=length)
    if origin is dict:
        values = payload_values if args[1] is Any else _value(args[1], {})
        return st.dictionaries(st.text(max_size=6), values, max_size=length)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(meta.get("ge", INT64_MIN), meta.get("le", UINT64_MAX))
    if tp is float:
        return st.floats(meta.get("ge"), meta.get("le"), allow_nan=False, allow_infinity=False)
    if tp is str:
        return st.text(max_size=min(meta.get("max_len", 64), 64))
    if tp is bytes:
        return st.binary(max_size=min(meta.get("max_len", 32), 32))
    raise AssertionError(f"no strategy for {tp!r}")


def _message(cls: type) -> st.SearchStrategy:
    hints = _hints(cls)
    return st.builds(
        cls, **{f.name: _value(hints[f.name], f.metadata) for f in dataclasses.fields(cls)}
    )


@FUZZ
@given(st.sampled_from(NAMES).flatmap(lambda n: _message(p.MESSAGE_TYPES[n])))
def test_valid_messages_round_trip(msg):
    frame = encode(msg)
    assert decode(frame) == msg
    assert encode(decode(frame)) == frame


@FEW
@given(_message(p.UpdateWeightsFromIPC))
def test_update_messages_with_nested_plans_round_trip(msg):
    assert decode(encode(msg)) == msg
