"""`rlsync` command line: one module per subcommand, each with `add_parser` and `run`.

Subcommand modules are imported lazily so `rlsync --help` stays fast and a subcommand's heavy
imports (Ray, torch) load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under rlsync.cli that defines add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "serve": "serve",
    "generate": "generate",
    "info": "info",
    "flush": "flush",
    "push": "push",
    "run": "run",
    "submit": "submit",
    "bench": "bench",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see `rlsync {name} --help`")
            continue
        try:
            mod = importlib.import_module(f"rlsync.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rlsync.cli.{module}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
