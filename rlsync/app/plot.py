"""Plot a run's metrics.jsonl: reward and push time per step, saved as a PNG (matplotlib Agg).

Knows nothing about Ray, engines or models; reads only the metrics rows.
"""

from __future__ import annotations

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
