"""Tune the learning hyper-parameters: GRPO on a task with the plain-torch sampler, no engine.

    python scripts/tune_task.py --steps 200 --lr 3e-3 --prompts 16 --group 4

Prints the mean reward every `--every` steps and the wall time. Knows nothing about Ray,
engines or weight sync.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from rlsync.config import TrainerConfig
from rlsync.model_config import ModelConfig
from trainer_side.learner import Learner, sample_rollouts
from trainer_side.policy import LlamaPolicy
from trainer_side.task import Task, get_task


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--task", default="copy_sequence")
    add("--length", type=int, default=4)
    add("--alphabet", type=int, default=8)
    add("--vocab", type=int, default=64)
    add("--hidden", type=int, default=64)
    add("--layers", type=int, default=2)
    add("--heads", type=int, default=4)
    add("--kv-heads", type=int, default=2)
    add("--tie", action="store_true", help="tie the embeddings and the LM head")
    add("--init-std", type=float, default=0.02)
    add("--lr", type=float, default=3e-3)
    add("--prompts", type=int, default=16)
    add("--group", type=int, default=4)
    add("--max-new", type=int, default=0, help="0: the task's answer length")
    add("--epochs", type=int, default=1)
    add("--minibatch", type=int, default=64)
    add("--clip", type=float, default=0.2)
    add("--advantage", default="grpo")
    add("--steps", type=int, default=200)
    add("--every", type=int, default=10)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    return ap.parse_args()


def position_hits(task: Task, prompts: list[list[int]], completions: list[list[int]],
                  i: int) -> float:
    """Share of samples whose completion token i is right."""
    right = [len(c) > i and c[i] == task.target(p)[i] for p, c in zip(prompts, completions, strict=True)]
    return sum(right) / len(right)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, tie_word_embeddings=a.tie)
    task = get_task(a.task, cfg, length=a.length, alphabet=a.alphabet)
    policy = LlamaPolicy.from_config(cfg, seed=a.seed, init_std=a.init_std)
    tcfg = TrainerConfig(lr=a.lr, ppo_epochs=a.epochs, minibatch_size=a.minibatch,
                         clip_eps=a.clip, advantage=a.advantage, seed=a.seed)
    learner = Learner(policy, tcfg, group_size=a.group)
    rng, gen = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    max_new = a.max_new or task.answer_len
    print(f"chance={task.chance_reward:.4f} max={task.max_reward}")
    start, window, hits = time.perf_counter(), [], [0.0] * task.answer_len
    for step in range(1, a.steps + 1):
        batch = sample_rollouts(policy, task, a.prompts, a.group, max_new, rng, gen)
        stats = learner.train_step(batch)
        window.append(stats["reward_mean"])
        hits = [h + position_hits(task, batch.prompts, batch.completions, i)
                for i, h in enumerate(hits)]
        if step % a.every == 0:
            print(f"step {step:4d} reward {sum(window) / len(window):.3f} "
                  f"entropy {stats['entropy']:.3f} clip {stats['clip_frac']:.3f} "
                  f"pos {' '.join(f'{h / a.every:.2f}' for h in hits)} "
                  f"t={time.perf_counter() - start:.1f}s", flush=True)
            window, hits = [], [0.0] * task.answer_len


if __name__ == "__main__":
    main()
