"""The RL loop with FSDP2 trainers (`trainer.parallel: fsdp`, world size 2) learns the copy
task as the replicated default does.

Two short learning runs on Ray, same seeds, same rollouts dealt to the same ranks: one with
replicated data-parallel ranks, one with the policy sharded by `fully_shard` and each rank
pushing its own shards through shared memory (and once more over broadcast, each rank
broadcasting its own rows). The sharded PPO step is the replicated one
(only the order of float sums may differ), so the engines sample the same tokens: the
reward of every step must be the same, and it must climb well above chance. At the end of
each run the launcher checks the engines' weights against the trainers' (all-gathered).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsync.app.launcher import RLRun, checked, prepare_run_dir, run_steps
from rlsync.app.run_config import load_config
from trainer_side.rl.task import get_task

STEPS = 40
QUICK = [
    f"steps={STEPS}",
    "trainer.world_size=2",
    "trainer.lr=2e-3",
    "task.prompts_per_step=16",
    "task.group_size=4",
    "engine.kv_tokens=1024",
    "sync.timeout_s=60",
    "engine.start_timeout_s=120",
]


def learn(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    cfg = checked(load_config(None, [f"name={name}", f"run_dir={tmp_path}", *QUICK, *extra]))
    with RLRun(cfg, prepare_run_dir(cfg)) as rl:
        result = run_steps(rl, progress=False)
    assert not any(result.mismatches.values()), result.mismatches
    return result.rows


@pytest.mark.usefixtures("ray_cluster")
def test_fsdp_run_learns_like_the_replicated_run(tmp_path: Path) -> None:
    sharded = learn(tmp_path, "fsdp", "trainer.parallel=fsdp")
    replicated = learn(tmp_path, "replicated")
    # each rank broadcasting its own rows lands the same bytes, so the same tokens
    broadcast = learn(tmp_path, "fsdp-bc", "trainer.parallel=fsdp", "sync.transport=broadcast")
    rewards = [r["reward_mean"] for r in sharded]
    assert rewards == [r["reward_mean"] for r in replicated]
    assert rewards == [r["reward_mean"] for r in broadcast]
    for a, b in zip(sharded, replicated, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["push_bytes"] == b["push_bytes"] > 0
    chance = get_task("copy_sequence", load_config(None, QUICK).model).chance_reward
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 2.5 * chance and last > 2.5 * first, (first, last)
