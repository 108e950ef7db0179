"""The one annotation validator: does a plain value (from msgpack or YAML) fit a dataclass
field's annotation, and what typed value does it make?

The wire codec (`rlsync.wire.codec`) and the config builder (`rlsync.config`) both walk field
annotations through `check`. They differ only in the `Rules` they pass: which error to raise,
how a nested dataclass is built, how a bad value is shown, the byte cap and nesting depth, and
whether a string such as "1e-4" may stand for a float (YAML 1.1 reads a float without a dot
as a string).

Handled: bool, int, float (an int widens; never NaN or inf), str, bytes, `Literal[...]`,
`list[T]`, `dict[K, V]`, `Any` (msgpack natives only), nested dataclasses, and `Union` /
`X | Y` of any of these. A Union accepts a value if ANY member does (members tried in the
order written, the first that accepts it gives the typed value), and None only where None is
a member. Limits (`ge`, `le`, `max_len`) come from the field's metadata. Every error names
the field (`where`). Knows nothing about messages, sockets or files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""1e-4 and friends: YAML 1.1 (PyYAML) reads a float without a dot as a string."""

NO_LIMITS: Mapping[str, Any] = types.MappingProxyType({})
_NONE = type(None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rules:
    """What differs between the wire and the config; everything else is shared."""

    error: Callable[[str, str], Exception]
    """(where, problem) -> the exception to raise; its message must start with `where`."""
    catch: tuple[type[Exception], ...]
    """What a failed Union member raises (the type `error` makes, and `build`'s)."""
    build: Callable[[type, Any, str, int], Any]
    """A nested dataclass from its plain value: (cls, value, where, depth) -> instance."""
    show: Callable[[Any], str] = lambda value: type(value).__name__
    """How a value that does not fit is named in the error."""
    bytes_cap: int | None = None
    """Most bytes in one bytes value (also inside `Any`); None: no cap."""
    max_depth: int | None = None
    """Deepest nesting of lists, maps and dataclasses; None: no limit."""
    float_strings: bool = False
    """Accept "1e-4"-style strings for float fields."""


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass `cls` (string annotations evaluated once)."""
    return typing.get_type_hints(cls)


def check(
    tp: Any,
    value: Any,
    where: str,
    rules: Rules,
    limits: Mapping[str, Any] = NO_LIMITS,
    depth: int = 0,
) -> Any:
    """Validate `value` against annotation `tp` (and field `limits`); return the typed value."""
    if rules.max_depth is not None and depth > rules.max_depth:
        raise rules.error(where, "nested too deep")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(args, value, where, rules, limits, depth)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise rules.error(where, f"{value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return rules.build(tp, value, where, depth)
    if origin is list:
        if not isinstance(value, list):
            raise rules.error(where, f"expected a list, got {rules.show(value)}")
        _check_len(value, where, rules, limits)
        return [
            check(args[0], v, f"{where}[{i}]", rules, NO_LIMITS, depth + 1)
            for i, v in enumerate(value)
        ]
    if origin is dict:
        if not isinstance(value, dict):
            raise rules.error(where, f"expected a map, got {rules.show(value)}")
        _check_len(value, where, rules, limits)
        return {
            check(args[0], k, where, rules, NO_LIMITS, depth): check(
                args[1], v, f"{where}.{k}", rules, NO_LIMITS, depth + 1
            )
            for k, v in value.items()
        }
    if tp is Any:
        return _check_any(value, where, rules, depth)
    return _check_scalar(tp, value, where, rules, limits)


def _check_union(
    args: tuple[Any, ...],
    value: Any,
    where: str,
    rules: Rules,
    limits: Mapping[str, Any],
    depth: int,
) -> Any:
    """The first member that accepts `value` gives the typed value; if none does, the error
    says why each member refused (one member: its own error, unchanged)."""
    if value is None and _NONE in args:
        return None
    failures = []
    for member in (a for a in args if a is not _NONE):
        try:
            return check(member, value, where, rules, limits, depth)
        except rules.catch as exc:
            failures.append((member, exc))
    if len(failures) == 1:
        raise failures[0][1]
    reasons = "; ".join(f"not {_name(m)} ({exc})" for m, exc in failures)
    raise rules.error(
        where, f"{rules.show(value)} fits no member of {_name_union(args)}: {reasons}"
    )


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp).removeprefix("typing.")


def _name_union(args: tuple[Any, ...]) -> str:
    return " | ".join("None" if a is _NONE else _name(a) for a in args)


def _check_scalar(tp: Any, value: Any, where: str, rules: Rules, limits: Mapping[str, Any]) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise rules.error(where, f"expected bool, got {rules.show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise rules.error(where, f"expected int, got {rules.show(value)}")
    elif tp is float:
        value = _float(value, where, rules)
    elif tp in (str, bytes):
        if not isinstance(value, tp):
            raise rules.error(where, f"expected {tp.__name__}, got {rules.show(value)}")
        if tp is bytes:
            _check_cap(value, where, rules)
        _check_len(value, where, rules, limits)
        return value
    else:
        raise rules.error(where, f"unsupported annotation {tp!r}")
    if "ge" in limits and value < limits["ge"]:
        raise rules.error(where, f"{value} is below the minimum {limits['ge']}")
    if "le" in limits and value > limits["le"]:
        raise rules.error(where, f"{value} is above the maximum {limits['le']}")
    return value


def _float(value: Any, where: str, rules: Rules) -> float:
    if rules.float_strings and isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise rules.error(where, f"expected float, got {rules.show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise rules.error(where, f"{value} is not finite")
    return value


def _check_len(value: Any, where: str, rules: Rules, limits: Mapping[str, Any]) -> None:
    if "max_len" in limits and len(value) > limits["max_len"]:
        raise rules.error(where, f"length {len(value)} exceeds {limits['max_len']}")


def _check_cap(value: bytes, where: str, rules: Rules) -> None:
    if rules.bytes_cap is not None and len(value) > rules.bytes_cap:
        raise rules.error(where, f"{len(value)} bytes exceeds the cap of {rules.bytes_cap}")


def _check_any(value: Any, where: str, rules: Rules, depth: int) -> Any:
    """Free-form values: msgpack natives only, bounded in depth and bytes."""
    if rules.max_depth is not None and depth > rules.max_depth:
        raise rules.error(where, "nested too deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        _check_cap(value, where, rules)
        return value
    if isinstance(value, list):
        return [_check_any(v, f"{where}[{i}]", rules, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            check(str, k, where, rules, NO_LIMITS, depth): _check_any(
                v, f"{where}.{k}", rules, depth + 1
            )
            for k, v in value.items()
        }
    raise rules.error(where, f"unsupported value type {type(value).__name__}")
