"""What tests/rlsync/wire/test_codec_fuzz.py does not cover: every field's limit is enforced at
its edge with an error naming that exact field; every prefix of every valid frame is
refused; msgpack headers that declare gigabytes are refused without allocating them; and
nesting, frame size and input type are bounded. All of it only ever raises ProtocolError.
"""

from __future__ import annotations

import dataclasses
import time
import typing

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsync.wire import protocol as p
from rlsync.wire.codec import MAX_DEPTH, MAX_FRAME_BYTES, ProtocolError, decode, encode
from tests.rlsync.wire.test_codec_fuzz import _message

NAMES = sorted(p.MESSAGE_TYPES)
REQUIRED = {"InitWeightsGroup": {"master_port": 1}}
"""Fields without a valid default, set so the frame is valid but for the field under test."""


def _limited_fields() -> list[tuple[str, str, str, object]]:
    """(message, field, limit, first value past it) for every top-level limited field."""
    out = []
    for name in NAMES:
        cls = p.MESSAGE_TYPES[name]
        hints = typing.get_type_hints(cls, vars(p))
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            scalar = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Union else tp
            meta = f.metadata
            if "ge" in meta:
                out.append(
                    (name, f.name, "ge", scalar(meta["ge"]) - (1 if scalar is int else 1e-3))
                )
            if "le" in meta:
                out.append(
                    (name, f.name, "le", scalar(meta["le"]) + (1 if scalar is int else 1e-3))
                )
            if "max_len" in meta:
                n = meta["max_len"] + 1
                too_long = (
                    "x" * n
                    if scalar is str
                    else {str(i): 0 for i in range(n)}
                    if typing.get_origin(scalar) is dict
                    else [0] * n
                )
                out.append((name, f.name, "max_len", too_long))
    return out


LIMITS = _limited_fields()


def test_every_limited_field_is_covered():
    assert len(LIMITS) >= 40  # a refactor that drops field metadata shows up here


@pytest.mark.parametrize(
    "name, field, limit, value", LIMITS, ids=[f"{n}.{f}.{lim}" for n, f, lim, _ in LIMITS]
)
def test_one_past_each_limit_is_refused_naming_the_field(name, field, limit, value):
    fields = {"request_id": "r", **REQUIRED.get(name, {})}
    decode(msgpack.packb([name, fields], use_bin_type=True))  # valid without the bad value
    frame = msgpack.packb([name, {**fields, field: value}], use_bin_type=True)
    with pytest.raises(ProtocolError) as exc:
        decode(frame)
    assert exc.value.where == f"{name}.{field}", str(exc.value)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(NAMES).flatmap(lambda n: _message(p.MESSAGE_TYPES[n])))
def test_every_prefix_of_a_valid_frame_is_refused(msg):
    frame = encode(msg)
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError):
            decode(frame[:cut])


HUGE_HEADERS = [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9\xff\xff\xff\xff"]  # arr/map/str/bin/ext


@pytest.mark.parametrize("head", HUGE_HEADERS, ids=["array32", "map32", "str32", "bin32", "ext32"])
@pytest.mark.parametrize("where", ["top", "fields", "input_ids", "model"])
def test_declared_gigabytes_are_refused_at_once(head, where):
    declared = head if head.startswith(b"\xc9") else head + b"\xff\xff\xff\xff"
    prefix = {
        "top": b"",
        "fields": b"\x92\xa8Generate",
        "input_ids": b"\x92\xa8Generate\x81\xa9input_ids",
        "model": b"\x92\xaaEngineInfo\x81\xa5model\x81\xa1k",
    }[where]
    start = time.perf_counter()
    with pytest.raises(ProtocolError):
        decode(prefix + declared + b"\x00" * 8)
    assert time.perf_counter() - start < 0.05  # nothing of the declared size was allocated


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200, 5_000, 100_000])
def test_deep_nesting_is_refused_not_a_recursion_error(depth):
    model = b"\x81\xa1k" * depth + b"\xc0"
    with pytest.raises(ProtocolError):
        decode(b"\x92\xaaEngineInfo\x82\xaarequest_id\xa1r\xa5model" + model)


def test_frame_over_the_cap_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize("value", [None, "GetInfo", 42, ["GetInfo", {}], bytearray(b"\x90")])
def test_non_bytes_input_only_raises_protocol_error(value):
    with pytest.raises(ProtocolError):
        decode(value)
