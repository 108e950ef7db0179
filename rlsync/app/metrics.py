"""Per-step metrics of an RL run: one JSON line per step in `runs/NAME/metrics.jsonl`.

Keys of every line (`STEP_KEYS`), all plain numbers:
- step: 0-based step index; weight_version: the version that generated this step's
  rollouts (== step when every push lands, as the loop waits for each push).
- reward_mean / reward_std: over every rollout of the step (all engines).
- loss, kl, kl_old, kl_ref, clip_frac, grad_norm, ratio_mean, entropy: the Learner's stats
  (those it reports), averaged over data-parallel ranks. `kl` is KL to the reference when trainer.kl_coef > 0, else KL to
  the engine's sampling policy (`kl_old`), which also shows trainer/engine numeric drift.
- push_s, push_gbps, push_bytes, engine_pause_ms: the WeightPusher's report of this step's
  push (engine_pause_ms: the longest any engine stopped generating); with two engines or
  more also commit_skew_ms (last engine's switch minus the first's). With `sync.delta`:
  push_delta (1: a delta, 0: a full push), push_wire_bytes, push_changed_fraction.
  push_revived: engines a push had missed that this one reached again (in full);
  engines_behind: engines the last push missed, which get no batch until one reaches them.
- rollout_s: seconds the slowest engine spent generating this step's batch (measured in
  its actor, from the first request sent to the last output; a push landing mid-batch
  counts in it); rollout_wait_s: how long the loop waited for the batch (about rollout_s with
  staleness 0, near 0 when generation hid behind the previous step); rollout_tokens,
  rollout_tokens_per_s (tokens / rollout_s).
- train_s, step_s: the PPO step and the whole step, wall clock; wall_s: seconds since the
  run started, at the end of this step.
- engine_idle_frac: 1 - (the engines' mean seconds generating this step's batch) / step_s,
  clipped to [0, 1]: the share of the step the engines had nothing to do (one batch is
  generated per step, so it is exact with staleness 0 and the steady-state share with k).
- versions_per_batch, newest_version, mixed_samples: how many weight versions produced the
  batch's tokens, the newest, and how many samples mix versions (an update landed
  mid-request); weight_version above is the oldest.
- dropped_stale: samples the trainers dropped for being more than `staleness` versions
  behind (summed over ranks; always 0 with staleness 0, which refuses such a batch instead);
  oldest_trained_version: the oldest version among the samples trained on (staleness >= 1).
At the end of a run, `summary.json` says whether every engine serves exactly the trainer's
weights (`compare_fingerprints`) and gives the model's combined `weights_fingerprint`.
Knows nothing about Ray, engines or models: only numbers and names.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlsync.wire.protocol import WeightFingerprints

STEP_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "kl",
    "loss",
    "push_s",
    "push_gbps",
    "engine_pause_ms",
    "weight_version",
    "rollout_tokens_per_s",
    "rollout_s",
    "train_s",
    "step_s",
    "wall_s",
    "engine_idle_frac",
    "dropped_stale",
    "versions_per_batch",
)
LEARNER_KEYS = ("loss", "kl", "kl_old", "clip_frac", "grad_norm", "ratio_mean", "entropy")


def reward_stats(rewards: Sequence[float]) -> dict[str, float]:
    """Mean and population std of the step's rewards."""
    return {
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
    }


def mean_over_ranks(
    per_rank: Sequence[Mapping[str, float]], kl_to_reference: bool
) -> dict[str, float]:
    """Average the Learner stats over data-parallel ranks; pick what `kl` means."""
    keys = [k for k in LEARNER_KEYS if all(k in s for s in per_rank)]
    out = {key: statistics.fmean(s[key] for s in per_rank) for key in keys}
    out["kl_ref"] = out.pop("kl", 0.0)
    out.setdefault("kl_old", 0.0)
    out["kl"] = out["kl_ref"] if kl_to_reference else out["kl_old"]
    return out


def staleness_stats(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Samples dropped for staleness (summed over ranks; 0 when the ranks report none) and
    the oldest version trained on (when they report it)."""
    out = {"dropped_stale": float(sum(s.get("dropped_stale", 0.0) for s in per_rank))}
    oldest = [s["oldest_trained_version"] for s in per_rank if "oldest_trained_version" in s]
    if oldest:
        out["oldest_trained_version"] = min(oldest)
    return out


def idle_fraction(busy_s: Sequence[float], step_s: float) -> float:
    """Share of `step_s` the engines (mean of their `busy_s`) had no generation to do."""
    if step_s <= 0 or not busy_s:
        return 0.0
    return min(1.0, max(0.0, 1.0 - statistics.fmean(busy_s) / step_s))


def push_stats(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a PushReport.to_dict() that go into the step line (commit_skew_ms, the
    last engine's switch minus the first's, only with two engines or more; with sync.delta
    also `push_delta` 1/0, `push_wire_bytes` and `push_changed_fraction`)."""
    out = {
        "push_s": float(report["seconds"]),
        "push_gbps": float(report["gbps"]),
        "push_bytes": float(report["bytes"]),
        "engine_pause_ms": float(report["engine_pause_ms"]),
        "push_revived": float(len(report.get("revived", []))),
    }
    if report.get("commit_skew_s") is not None:
        out["commit_skew_ms"] = 1e3 * float(report["commit_skew_s"])
    if report.get("delta"):
        out["push_delta"] = float(report["delta"] == "delta")
        out["push_wire_bytes"] = float(report["wire_bytes"])
        out["push_changed_fraction"] = float(report["changed_fraction"])
    return out


class MetricsLog:
    """Appends one JSON line per step; truncates the file when opened (a fresh run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")
        self.rows: list[dict[str, Any]] = []

    def write(self, row: Mapping[str, Any]) -> None:
        missing = [k for k in STEP_KEYS if k not in row]
        if missing:
            raise KeyError(f"metrics row for step {row.get('step')} lacks {missing}")
        self._file.write(json.dumps(dict(row), sort_keys=True) + "\n")
        self._file.flush()
        self.rows.append(dict(row))

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every row of a metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights_fingerprint(fingerprints: Mapping[str, int]) -> int:
    """One number for a whole model: a hash of the sorted (name, tensor fingerprint) pairs."""
    text = ";".join(f"{name}={fingerprints[name]}" for name in sorted(fingerprints))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def compare_fingerprints(
    ranks: Mapping[str, Mapping[str, int]],
    engines: Mapping[str, WeightFingerprints],
    expected_version: int,
) -> dict[str, list[str]]:
    """Trainer rank or engine -> what differs from trainer rank 0 (empty: identical).

    `ranks`: rank name -> tensor name -> fingerprint, "trainer rank 0" among them.
    `engines`: engine name -> its WeightFingerprints.
    """
    ref = ranks["trainer rank 0"]
    out: dict[str, list[str]] = {}
    for name, fps in ranks.items():
        if name != "trainer rank 0":
            out[name] = sorted(k for k in ref if fps.get(k) != ref[k])
    for name, reply in engines.items():
        diff = sorted(k for k in ref if reply.fingerprints.get(k) != ref[k])
        if reply.weight_version != expected_version:
            diff.insert(0, f"weight_version={reply.weight_version} (expected {expected_version})")
        out[name] = diff
    return out


def write_summary(path: Path, rows: Sequence[Mapping[str, Any]], **facts: Any) -> dict[str, Any]:
    """summary.json: the facts given (paths as strings) plus step count, first/last reward,
    mean seconds per step and samples dropped for staleness."""
    summary = {
        "steps": len(rows),
        **{k: str(v) if isinstance(v, Path) else v for k, v in facts.items()},
        "weights_match": not any(facts.get("mismatches", {}).values()),
        "reward_first": rows[0]["reward_mean"] if rows else None,
        "reward_last": rows[-1]["reward_mean"] if rows else None,
        "seconds_per_step": statistics.fmean(r["step_s"] for r in rows) if rows else None,
        "dropped_stale": sum(r["dropped_stale"] for r in rows),
    }
    path.write_text(json.dumps(summary, indent=2))
    return summary
