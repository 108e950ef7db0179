"""Plot metrics.jsonl files as PNGs (matplotlib Agg): one run's reward and push time per step
(`plot_metrics`), or several runs' reward against wall-clock seconds in one figure
(`plot_runs`; e.g. staleness 0 against staleness 1):

    python -m rlsync.app.plot --out docs/async_reward.png \
        "staleness 0=runs/sync/metrics.jsonl" "staleness 1=runs/async/metrics.jsonl"

Knows nothing about Ray, engines or models; reads only the metrics rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_metrics(rows: Sequence[Mapping[str, Any]], out: Path, title: str = "") -> Path:
    """Two panels sharing the step axis: reward (mean +- std) and push time (ms)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe inside Ray jobs and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(steps, mean, marker="o", label="reward mean")
    top.fill_between(
        steps,
        [m - s for m, s in zip(mean, std, strict=True)],
        [m + s for m, s in zip(mean, std, strict=True)],
        alpha=0.2,
        label="+- std",
    )
    top.set_ylabel("reward")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot(
        steps, [r["push_s"] * 1e3 for r in rows], marker="o", color="tab:orange", label="push"
    )
    bottom.plot(
        steps,
        [r["engine_pause_ms"] for r in rows],
        marker="x",
        color="tab:red",
        label="engine pause",
    )
    bottom.set_ylabel("ms")
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    fig.suptitle(title or "rlsync run")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _label(ax: Any, xlabel: str, ylabel: str, legend: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend)
    ax.grid(alpha=0.3)


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: Path, title: str = "") -> Path:
    """Reward (mean per step) against wall-clock seconds, one line per run (label -> rows),
    above each run's seconds per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), height_ratios=(2, 1))
    for label, rows in runs.items():
        wall = [r["wall_s"] for r in rows]
        per_step = sum(r["step_s"] for r in rows) / max(len(rows), 1)
        top.plot(wall, [r["reward_mean"] for r in rows], label=f"{label} ({per_step:.2f} s/step)")
        bottom.plot([r["step"] for r in rows], [r["step_s"] for r in rows], label=label)
    _label(top, "wall-clock seconds", "reward (mean of the step)", "lower right")
    _label(bottom, "step", "seconds per step", "upper right")
    fig.suptitle(title or "reward against wall-clock time")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from rlsync.app.metrics import read_metrics

    parser = argparse.ArgumentParser(description="reward vs wall-clock seconds of several runs")
    parser.add_argument("runs", nargs="+", metavar="LABEL=METRICS_JSONL")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=PATH")
        runs[label] = read_metrics(Path(path))
    print(plot_runs(runs, args.out, args.title))


if __name__ == "__main__":
    main()
