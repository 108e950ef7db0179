"""`rlsync flush`: reset a running engine's prefix cache and KV pool (only when it is idle).

    rlsync flush --endpoint E [--no-empty-cache]

Exit codes: 0 flushed, 1 the engine refused (e.g. requests running), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flush", help="flush a running engine's KV / prefix cache")
    p.add_argument("--endpoint", required=True, help="engine endpoint (ipc:// or tcp://)")
    p.add_argument("--no-empty-cache", action="store_true",
                   help="skip torch.cuda.empty_cache() (it syncs every CUDA stream)")
    p.add_argument("--auth-keys", default=None, metavar="DIR",
                   help="CURVE key directory of an engine served with --auth-keys (rlsync.auth)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the engine")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infer_side.client import UNREACHABLE_ERRORS, connect
    from rlsync.rpc import RpcError

    try:
        with connect(args.endpoint, timeout_s=args.timeout, auth_keys=args.auth_keys) as engine:
            result = engine.flush_cache(empty_cache=not args.no_empty_cache)
    except RpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (*UNREACHABLE_ERRORS, ValueError) as exc:  # ValueError: bad key directory
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"flushed {args.endpoint}" + (f": {result.message}" if result.message else ""))
    return 0
