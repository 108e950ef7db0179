"""One annotation validator for the wire (codec) and the config: every member of a Union counts.

A value valid for the second member of a Union (`int | str`, `Literal[...] | int | None`, a
nested dataclass `| str | None`) is accepted on decode and in a config; a value valid for no
member is refused with an error that names the field.
"""

import dataclasses
from typing import Literal

import msgpack
import pytest

from rlsync.config import ConfigError, build
from rlsync.wire import codec, protocol
from rlsync.wire.codec import ProtocolError


@dataclasses.dataclass(kw_only=True)
class _Inner:
    x: int = 0


@dataclasses.dataclass(kw_only=True)
class _Unions:
    limit: int | str = 0
    mode: Literal["a", "b"] | int | None = None
    inner: _Inner | str | None = None
    ratio: float | None = None


GOOD = [
    ({"limit": "auto"}, {"limit": "auto"}),
    ({"limit": 7}, {"limit": 7}),
    ({"mode": "b"}, {"mode": "b"}),
    ({"mode": 3}, {"mode": 3}),
    ({"mode": None}, {"mode": None}),
    ({"inner": "by-name"}, {"inner": "by-name"}),
    ({"inner": {"x": 2}}, {"inner": _Inner(x=2)}),
    ({"ratio": 2}, {"ratio": 2.0}),
]
BAD = [
    ({"limit": 1.5}, "limit"),
    ({"limit": None}, "limit"),
    ({"limit": True}, "limit"),
    ({"mode": "c"}, "mode"),
    ({"mode": [1]}, "mode"),
    ({"inner": {"x": "two"}}, "inner"),
    ({"inner": 5}, "inner"),
    ({"ratio": "fast"}, "ratio"),
]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("raw", "expected"), GOOD, ids=[repr(g[0]) for g in GOOD])
def test_config_accepts_a_value_valid_for_any_union_member(raw, expected):
    cfg = build(_Unions, raw, "")
    for key, value in expected.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)


@pytest.mark.parametrize(("raw", "key"), BAD, ids=[repr(b[0]) for b in BAD])
def test_config_refuses_a_value_valid_for_no_member_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        build(_Unions, raw, "")
    assert str(info.value).startswith(key), str(info.value)


def test_config_union_error_names_the_dotted_key():
    @dataclasses.dataclass(kw_only=True)
    class Outer:
        unions: _Unions = dataclasses.field(default_factory=_Unions)

    with pytest.raises(ConfigError, match=r"^unions\.limit: "):
        build(Outer, {"unions": {"limit": 1.5}}, "")


# ---------------------------------------------------------------- wire


@pytest.fixture
def wire(monkeypatch):
    """_Unions as a protocol message, for the length of one test."""
    monkeypatch.setitem(protocol.MESSAGE_TYPES, "_Unions", _Unions)


def _frame(fields: dict) -> bytes:
    return msgpack.packb(["_Unions", fields], use_bin_type=True)


@pytest.mark.parametrize(("raw", "expected"), GOOD, ids=[repr(g[0]) for g in GOOD])
def test_decode_accepts_a_value_valid_for_any_union_member(wire, raw, expected):
    msg = codec.decode(_frame(raw))
    for key, value in expected.items():
        assert getattr(msg, key) == value and type(getattr(msg, key)) is type(value)
    assert codec.decode(codec.encode(msg)) == msg


@pytest.mark.parametrize(("raw", "key"), BAD, ids=[repr(b[0]) for b in BAD])
def test_decode_refuses_a_value_valid_for_no_member_naming_the_field(wire, raw, key):
    with pytest.raises(ProtocolError) as info:
        codec.decode(_frame(raw))
    assert info.value.where.startswith(f"_Unions.{key}"), str(info.value)
    assert str(info.value).startswith(info.value.where + ": ")
