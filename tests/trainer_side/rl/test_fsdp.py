"""FSDP2 sharding of the policy: the row ranges a push relies on, and a sharded PPO step that
equals the one-process step on the whole batch.

Real gloo process groups in spawned processes; the policy is sharded with `fully_shard`.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from rlsync.model_config import ModelConfig
from rlsync.transports.sharded.dim0 import dim0_shard, full_tensors, local_rows, row_splits
from trainer_side.rl.config import ConfigError, TrainerConfig
from trainer_side.rl.fsdp import shard_policy
from trainer_side.rl.learner import Learner, RolloutBatch, sample_rollouts
from trainer_side.rl.policy import LlamaPolicy
from trainer_side.rl.task import get_task

# vocab 33 and intermediate 70 split unevenly over 2 and 4 ranks; tied embeddings
MODEL = ModelConfig(
    vocab_size=33, hidden_size=32, intermediate_size=70, num_hidden_layers=1,
    tie_word_embeddings=True,
)  # fmt: skip


def _batch(policy: LlamaPolicy, seed: int) -> RolloutBatch:
    task = get_task("copy_sequence", policy.cfg)
    return sample_rollouts(
        policy,
        task,
        4,
        4,
        task.answer_len,
        random.Random(seed),
        torch.Generator().manual_seed(seed),
    )


def _split(batch: RolloutBatch, rows: range) -> RolloutBatch:
    fields = ("prompts", "completions", "logprobs", "rewards")
    return RolloutBatch(*([getattr(batch, f)[i] for i in rows] for f in fields))


def _worker(rank: int, world: int, init: str, out: str, cfg: TrainerConfig, batches) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    policy = LlamaPolicy.from_config(MODEL, seed=7)
    reference = copy.deepcopy(policy)  # the KL reference: copied, then sharded too
    shard_policy(reference, world, "cpu")
    shard_policy(policy, world, "cpu")
    rows = {}
    for name, p in policy.named_parameters():
        shard = dim0_shard(p, rank)
        rows[name] = torch.tensor([shard.start, shard.rows])
        bounds = row_splits(p, world)  # what a sharded broadcast push announces
        assert bounds[rank : rank + 2] == [shard.start, shard.start + shard.rows], name
        assert local_rows({name: p}, {name: bounds}, rank).get(name, p.new_empty(0)).numel() == (
            shard.local.numel() if shard.rows else 0
        )
    learner = Learner(
        policy,
        cfg,
        group_size=4,
        process_group=dist.group.WORLD,
        sharded=True,
        reference=reference,
    )
    for batch in batches:
        learner.train_step(batch)
    full = dict(full_tensors(policy.named_parameters()))
    save_file({n: t.contiguous() for n, t in full.items()}, f"{out}/full{rank}.safetensors")
    save_file(rows, f"{out}/rows{rank}.safetensors")
    dist.destroy_process_group()


def _run(tmp_path: Path, world: int, cfg: TrainerConfig, shards: list[list[RolloutBatch]]):
    init = f"file://{tmp_path}/rendezvous"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, init, str(tmp_path), cfg, shards[r]))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_step_equals_one_process_on_the_whole_batch(tmp_path: Path, world: int) -> None:
    cfg = TrainerConfig(lr=1e-2, ppo_epochs=2, minibatch_size=64, max_grad_norm=0.5, kl_coef=0.05)
    policy = LlamaPolicy.from_config(MODEL, seed=7)
    batches = [_batch(policy, seed=s) for s in (1, 2)]  # 4 groups of 4 samples each
    per = 16 // world  # whole groups per rank
    shards = [[_split(b, range(r * per, (r + 1) * per)) for b in batches] for r in range(world)]
    _run(tmp_path, world, cfg, shards)
    learner = Learner(policy, cfg, group_size=4)
    for batch in batches:
        learner.train_step(batch)
    got = [load_file(tmp_path / f"full{r}.safetensors") for r in range(world)]
    rows = [load_file(tmp_path / f"rows{r}.safetensors") for r in range(world)]
    for name, p in policy.named_parameters():
        assert all(torch.equal(got[0][name], g[name]) for g in got[1:]), name
        torch.testing.assert_close(got[0][name], p.detach(), rtol=0, atol=2e-5)
        counts = [int(r[name][1]) for r in rows]
        assert sum(counts) == p.shape[0], name  # every row held by exactly one rank
        assert [int(r[name][0]) for r in rows] == [sum(counts[:i]) for i in range(world)], name
    assert [int(r["model.embed_tokens.weight"][1]) for r in rows] == (
        [17, 16] if world == 2 else [9, 9, 9, 6]
    )  # uneven: ceil(33 / world) rows per rank, the last rank the rest


def test_push_method_follows_transport_and_device() -> None:
    fsdp = TrainerConfig(parallel="fsdp")
    assert fsdp.push_method("ipc", "cpu") == "shards"
    assert fsdp.push_method("broadcast", "cpu") == "shards"
    assert fsdp.push_method("disk", "cpu") == "gather"
    assert fsdp.push_method("broadcast", "cuda") == "gather"
    assert fsdp.push_method("ipc", "cuda") == "gather"
    assert fsdp.push_method("ipc", "cpu", delta=True) == "gather"  # deltas need whole tensors
    assert TrainerConfig().push_method("ipc", "cpu") == "replicated"
    with pytest.raises(ConfigError, match="fsdp_push=shards"):
        TrainerConfig(parallel="fsdp", fsdp_push="shards").push_method("disk", "cpu")
    with pytest.raises(ConfigError, match="without sync.delta"):
        TrainerConfig(parallel="fsdp", fsdp_push="shards").push_method("ipc", "cpu", True)
