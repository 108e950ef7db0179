"""Per-step metrics of an RL run: one JSON line per step in `runs/NAME/metrics.jsonl`.

Keys of every line (`STEP_KEYS`), all plain numbers:
- step: 0-based step index; weight_version: the version that generated this step's
  rollouts (== step when every push lands, as the loop waits for each push).
- reward_mean / reward_std: over every rollout of the step (all engines).
- loss, kl, kl_old, kl_ref, clip_frac, grad_norm: the Learner's stats, averaged over
  data-parallel ranks. `kl` is KL to the reference when trainer.kl_coef > 0, else KL to
  the engine's sampling policy (`kl_old`), which also shows trainer/engine numeric drift.
- push_s, push_gbps, push_bytes, engine_pause_ms: the WeightPusher's report of this step's
  push (engine_pause_ms: the longest any engine stopped generating).
- rollout_s, rollout_tokens, rollout_tokens_per_s: generation on all engines together.
- train_s, step_s: the PPO step and the whole step, wall clock.
Knows nothing about Ray, engines or models.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STEP_KEYS = ("step", "reward_mean", "reward_std", "kl", "loss", "push_s", "push_gbps",
             "engine_pause_ms", "weight_version", "rollout_tokens_per_s")
LEARNER_KEYS = ("loss", "kl", "kl_old", "clip_frac", "grad_norm")


def reward_stats(rewards: Sequence[float]) -> dict[str, float]:
    """Mean and population std of the step's rewards."""
    return {"reward_mean": statistics.fmean(rewards),
            "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0}


def mean_over_ranks(per_rank: Sequence[Mapping[str, float]], kl_to_reference: bool) -> dict[str, float]:
    """Average the Learner stats over data-parallel ranks; pick what `kl` means."""
    out = {key: statistics.fmean(s.get(key, 0.0) for s in per_rank) for key in LEARNER_KEYS}
    out["kl_ref"] = out.pop("kl")
    out["kl"] = out["kl_ref"] if kl_to_reference else out["kl_old"]
    return out


def push_stats(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a PushReport.to_dict() that go into the step line."""
    return {"push_s": float(report["seconds"]), "push_gbps": float(report["gbps"]),
            "push_bytes": float(report["bytes"]),
            "engine_pause_ms": float(report["engine_pause_ms"])}


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
