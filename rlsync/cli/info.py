"""`rlsync info`: what a running engine serves: weight version, model, KV pool, prefix cache.

    rlsync info --endpoint E [--json]

Prints the engine's EngineInfo reply (as JSON with --json). Exit codes: 0 ok, 1 the engine refused,
2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rlsync.cli.engine_call import add_connection_args, call_engine


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a running engine's version, model and cache usage")
    add_connection_args(p, 30.0)
    p.add_argument("--json", action="store_true", help="print the info as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    code, info = call_engine(args, lambda engine: dataclasses.asdict(engine.info()))
    if code:
        return code
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=_bytes_hex))
    else:
        print(f"engine at {args.endpoint}")
        print("\n".join(format_tree(info)))
    return 0


def format_tree(value: dict[str, Any], indent: int = 1) -> list[str]:
    """`key: value` lines, nested maps indented; weight_version first when present."""
    keys = sorted(value, key=lambda k: (k != "weight_version", k))
    lines = []
    for key in keys:
        item = value[key]
        if isinstance(item, dict):
            lines.append(f"{'  ' * indent}{key}:")
            lines.extend(format_tree(item, indent + 1))
        else:
            lines.append(f"{'  ' * indent}{key}: {item}")
    return lines


def _bytes_hex(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
