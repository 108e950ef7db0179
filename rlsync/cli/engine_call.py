"""One control call to a running engine from the CLI, with the CLI's exit codes:
0 ok, 1 the engine said no, 2 unreachable or bad key material (the reason on stderr)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_connection_args(p: argparse.ArgumentParser, timeout_s: float) -> None:
    p.add_argument("--endpoint", required=True, help="engine endpoint (ipc:// or tcp://)")
    p.add_argument(
        "--auth-keys",
        default=None,
        metavar="DIR",
        help="CURVE key directory of an engine served with --auth-keys (rlsync.wire.auth)",
    )
    p.add_argument(
        "--timeout", type=float, default=timeout_s, help="seconds to wait for the engine"
    )


def call_engine(args: argparse.Namespace, call: Callable[[Any], Any]) -> tuple[int, Any]:
    """(exit code, what `call(engine)` returned, or None on failure)."""
    from infer_side.process.client import UNREACHABLE_ERRORS, connect
    from rlsync.wire.rpc import RpcError

    try:
        with connect(args.endpoint, timeout_s=args.timeout, auth_keys=args.auth_keys) as engine:
            return 0, call(engine)
    except RpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    except (*UNREACHABLE_ERRORS, ValueError) as exc:  # ValueError: bad key directory
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
