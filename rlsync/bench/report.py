"""Render a sync-benchmark result: a Markdown table per model size, JSON, and a bar chart.

Reads only the result dict `rlsync.bench.sync.run_sync` returns (rows as plain dicts), so a
saved JSON can be re-rendered later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "method",
    "N",
    "e2e best s",
    "median s",
    "GB/s",
    "copies/byte",
    "x memcpy",
    "x ours",
    "transfer s",
    "control ms",
    "trainer block s",
    "gap before ms",
    "max gap ms",
    "tokens in push",
    "engine pause ms",
    "note",
)
KIND_ORDER = {"limit": 0, "ours": 1, "baseline": 2}
NOTES = {"limit": "limit", "baseline": "~ receiver recv+load (no live engine)"}


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"


def _phase(r: dict[str, Any], key: str, scale: float) -> str:
    """A push phase of ours (transfer, and control: everything that is not the transfer)."""
    value = (r.get("phases") or {}).get(key)
    return "" if value is None else _num(value * scale, 3 if scale == 1 else 2)


def sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["size_gib"], r["engines"], KIND_ORDER.get(r["kind"], 9)))


def row_cells(r: dict[str, Any]) -> list[str]:
    label = f"{r['kind']}: {r['label']}" if r["kind"] != "ours" else f"**ours: {r['label']}**"
    if r["error"]:
        return [
            label,
            str(r["engines"]),
            "FAILED",
            *[""] * (len(COLUMNS) - 4),
            r["error"].splitlines()[0][:80],
        ]
    pause = r["engine_pause_ms"]
    pause_cell = (
        _num(pause, 1) if r["kind"] != "baseline" or pause is None else f"~{_num(pause, 0)}"
    )
    note = NOTES.get(r["kind"], "")
    if r["kind"] == "ours" and r.get("verified") is not None:
        note = "bit-exact" if r["verified"] else "MISMATCH"
    return [
        label,
        str(r["engines"]),
        _num(r["best_s"]),
        _num(r["median_s"]),
        _num(r["gbps"], 2),
        "" if r.get("copies") is None else f"{r['copies']:.2g}",
        _num(r["x_memcpy"], 2),
        _num(r["x_ours"], 1),
        _phase(r, "transfer_s", 1),
        _phase(r, "control_s", 1e3),
        _num(r["block_median_s"]),
        _num(r["normal_gap_ms"], 1),
        _num(r["max_gap_ms"], 1),
        "n/a" if r.get("tokens_during") is None else str(r["tokens_during"]),
        pause_cell,
        note,
    ]


def format_table(result: dict[str, Any]) -> str:
    """One Markdown table per model size (rows grouped by engine count)."""
    out = []
    rows = sorted_rows(result["rows"])
    # results saved before the probe counted tokens have no such column
    keep = [
        i
        for i, c in enumerate(COLUMNS)
        if c != "tokens in push" or any("tokens_during" in r for r in rows)
    ]
    for size in sorted({r["size_gib"] for r in rows}):
        model = result.get("models", {}).get(str(size), {})
        out.append(f"\n### {size:g} GiB model: {_model_line(model)}\n")
        out.append("| " + " | ".join(COLUMNS[i] for i in keep) + " |")
        out.append("|" + "---|" * len(keep))
        for r in rows:
            if r["size_gib"] == size:
                cells = row_cells(r)
                out.append("| " + " | ".join(cells[i] for i in keep) + " |")
    return "\n".join(out) + "\n"


PROFILE_KEYS = ("memcpy_1t", "memcpy", "pack", "load_1t", "cold_copy", "per_tensor_copy")


def format_profile(result: dict[str, Any]) -> str:
    """Each copy a push makes, timed alone (see rlsync.bench.profile), per model size."""
    models = {s: m["profile"] for s, m in result.get("models", {}).items() if "profile" in m}
    if not models:
        return ""
    head = "| size GiB | " + " | ".join(f"{k} s (GB/s)" for k in PROFILE_KEYS) + " |"
    lines = [
        "\ncopies timed alone (best of repeats):\n",
        head,
        "|" + "---|" * (len(PROFILE_KEYS) + 1),
    ]
    for size, p in models.items():
        cells = [f"{p[k + '_s']:.3f} ({p[k + '_gbps']:.1f})" for k in PROFILE_KEYS]
        lines.append(f"| {float(size):g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model_line(m: dict[str, Any]) -> str:
    if "tensors" not in m:
        return ""
    return (
        f"{m['bytes'] / 2**30:.3f} GiB fp32, {m['tensors']} tensors ({m['tensors_under_1mib']} "
        f"under 1 MiB), hidden {m['hidden']}, MLP {m['intermediate']}, {m['layers']} layers, "
        f"{m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}"
    )


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def plot(result: dict[str, Any], path: Path) -> Path:
    """GB/s per method, one panel per (size, engines); limits grey, ours blue, baselines red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in sorted_rows(result["rows"]) if not r["error"] and r["gbps"]]
    groups = sorted({(r["size_gib"], r["engines"]) for r in rows})
    if not groups:
        raise ValueError("nothing to plot: no successful rows")
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(
        1, len(groups), figsize=(4.2 * len(groups), 5.5), squeeze=False, sharex=True
    )
    colors = {"limit": "tab:gray", "ours": "tab:blue", "baseline": "tab:red"}
    for ax, (size, n) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if (r["size_gib"], r["engines"]) == (size, n)]
        ax.barh(
            [r["label"] for r in sel],
            [r["gbps"] for r in sel],
            color=[colors.get(r["kind"], "k") for r in sel],
        )
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a log axis
        ax.set_title(f"{size:g} GiB, {n} engine{'s' if n > 1 else ''}")
        ax.set_xlabel("GB/s (best of repeats, log)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("rlsync weight sync vs baselines and limits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
