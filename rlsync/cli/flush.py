"""`rlsync flush`: reset a running engine's prefix cache and KV pool (only when it is idle).

    rlsync flush --endpoint E [--no-empty-cache]

Exit codes: 0 flushed, 1 the engine refused (e.g. requests running), 2 bad usage or unreachable.
"""

from __future__ import annotations

import argparse

from rlsync.cli.engine_call import add_connection_args, call_engine


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flush", help="flush a running engine's KV / prefix cache")
    add_connection_args(p, 30.0)
    p.add_argument(
        "--no-empty-cache",
        action="store_true",
        help="skip torch.cuda.empty_cache() (it syncs every CUDA stream)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    code, result = call_engine(args, lambda e: e.flush_cache(empty_cache=not args.no_empty_cache))
    if code:
        return code
    print(f"flushed {args.endpoint}" + (f": {result.message}" if result.message else ""))
    return 0
