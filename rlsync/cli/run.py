"""`rlsync run CONFIG [--set key=value ...]`: the RL loop on Ray (local or a cluster).

A thin shell over `rlsync.app.launcher.run`: load the config, run, print where things went.
Exit codes: 0 done, 1 the run failed (the message names the actor and step), 2 bad config.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the RL loop (trainers + engines on Ray)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "config", nargs="?", default=None, help="YAML run config (default: built-in defaults)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set steps=5 --set trainer.lr=1e-3",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlsync.app.run_config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rlsync.app.launcher import RunError
    from rlsync.app.launcher import run as run_loop

    try:
        result = run_loop(cfg, progress=not args.no_progress)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"run {cfg.name} failed: {exc}", file=sys.stderr)
        return 1
    _print_summary(result)
    return 0


def _print_summary(result) -> None:  # noqa: ANN001 - RunResult, imported lazily
    rows = result.rows
    for row in rows:
        print(
            f"step {row['step']:3d}  v{row['weight_version']}  reward {row['reward_mean']:.3f} "
            f"+- {row['reward_std']:.3f}  kl {row['kl']:.1e}  push {row['push_s'] * 1e3:7.1f} ms "
            f"({row['push_gbps']:.3f} GB/s, pause {row['engine_pause_ms']:.1f} ms)  "
            f"{row['rollout_tokens_per_s']:.0f} tok/s  step {row['step_s']:.3f} s "
            f"(engine idle {row['engine_idle_frac']:.0%}, dropped {row['dropped_stale']:.0f})"
        )
    print(
        f"done: {len(rows)} steps in {result.wall_s:.1f} s "
        f"({sum(r['step_s'] for r in rows) / max(len(rows), 1):.3f} s per step); "
        "engine weights == trainer weights; "
        f"metrics {result.run_dir / 'metrics.jsonl'}; final checkpoint {result.final_checkpoint}"
    )
