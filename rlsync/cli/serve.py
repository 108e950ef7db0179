"""`rlsync serve`: run one inference engine in the foreground until Shutdown or Ctrl-C.

    rlsync serve --model DIR [--backend rlsync|vllm] [--endpoint E] [--kv-tokens N]
                 [--device cpu] [--threads N]
                 [--auth-keys DIR | --insecure-tcp]

Prints `ready at ENDPOINT` once the model is loaded and the engine accepts requests. A
tcp:// endpoint is refused without `--auth-keys DIR` (CURVE keys from `python -m rlsync.wire.auth
DIR`) unless `--insecure-tcp` is given.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from infer_side.process.server import add_arguments

    p = sub.add_parser("serve", help="run an inference engine in the foreground")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infer_side.process.server import run_foreground

    try:
        return run_foreground(args)
    except KeyboardInterrupt:
        return 130
