"""One PPO/GRPO optimisation step on a batch of rollouts, in plain torch (no Ray, no sync).

`Learner.train_step(batch)` pads prompts + completions, computes group advantages from the
rewards, runs `ppo_epochs` passes of shuffled minibatches of the clipped loss against the
engine's sampling log-probs, averages gradients over an explicit data-parallel process
group (if one is given; never the default group), clips them to `max_grad_norm` and steps
AdamW. Each data-parallel rank passes its own share of rollouts, whole groups only.
With `sharded=True` the policy is an FSDP2 module (`trainer_side.rl.fsdp`): ranks start from
the same checkpoint, and FSDP itself averages the gradients (a reduce-scatter) over its mesh,
so the step is the replicated one with each rank holding only its shard.

Hyper-parameters that learn the copy task from a random init (lr 5e-4, 32 prompts x 8
samples, one optimizer step per batch) are `RECOMMENDED` in tests/trainer_side/rl/test_learning.py.

`sample_rollouts` is a plain-torch stand-in for the engine (temperature sampling, full
recompute, records its own log-probs), for tests, tuning and single-process demos.

It knows nothing about engines or weight sync.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer_side.rl.config import TrainerConfig
from trainer_side.rl.fsdp import to_local_float
from trainer_side.rl.ppo import baseline_advantages, grpo_advantages, ppo_loss, token_logprobs
from trainer_side.rl.task import Task


@dataclass
class RolloutBatch:
    """Rollouts in groups of `group_size` consecutive samples of the same prompt."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logprobs: list[list[float]]
    """The engine's log-prob of each sampled completion token."""
    rewards: list[float]
    token_versions: list[list[int]] | None = None
    """The weight version that sampled each completion token (None: not recorded)."""

    def __post_init__(self) -> None:
        n = len(self.prompts)
        for name in ("completions", "logprobs", "rewards", "token_versions"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"RolloutBatch.{name}: {len(value)} items, prompts has {n}")
        for name in ("logprobs", "token_versions"):
            values = getattr(self, name)
            if values is None:
                continue
            for i, (c, per_token) in enumerate(zip(self.completions, values, strict=True)):
                if len(c) != len(per_token):
                    raise ValueError(
                        f"RolloutBatch.{name}[{i}]: {len(per_token)} values for {len(c)} "
                        "completion tokens"
                    )


@dataclass
class PaddedBatch:
    """Right-padded tensors; position t of `targets`/`old_logprobs`/`mask` is predicted at t."""

    input_ids: Tensor  # [N, T]
    attention_mask: Tensor  # [N, T]
    targets: Tensor  # [N, T-1] = input_ids[:, 1:]
    old_logprobs: Tensor  # [N, T-1]
    mask: Tensor  # [N, T-1], true on completion tokens

    def select(self, idx: Tensor) -> PaddedBatch:
        return PaddedBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def pad_batch(batch: RolloutBatch, pad_id: int, device: torch.device) -> PaddedBatch:
    """Prompt + completion per row, right-padded; loss mask covers the completion only."""
    seqs = [p + c for p, c in zip(batch.prompts, batch.completions, strict=True)]
    n, t = len(seqs), max(2, max(len(s) for s in seqs))
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    attn = torch.zeros(n, t, dtype=torch.long)
    old = torch.zeros(n, t - 1)
    mask = torch.zeros(n, t - 1, dtype=torch.bool)
    for i, (p, c, lp) in enumerate(
        zip(batch.prompts, batch.completions, batch.logprobs, strict=True)
    ):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : len(p) + len(c)] = 1
        old[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(lp, dtype=torch.float32)
        mask[i, len(p) - 1 : len(p) - 1 + len(c)] = True
    out = PaddedBatch(ids, attn, ids[:, 1:], old, mask)
    return PaddedBatch(*(getattr(out, f).to(device) for f in out.__dataclass_fields__))


def drop_samples(data: PaddedBatch, keep: list[bool]) -> PaddedBatch:
    """The same batch with the loss mask cleared on every sample whose `keep` is False."""
    if len(keep) != data.mask.shape[0]:
        raise ValueError(f"keep: {len(keep)} flags for {data.mask.shape[0]} samples")
    rows = torch.tensor(keep, dtype=torch.bool, device=data.mask.device)
    return replace(data, mask=data.mask & rows[:, None])


class Learner:
    """Holds the policy, AdamW, an optional frozen reference, and does one PPO step per call.

    `group_size` is the number of consecutive samples per prompt (advantages are normalised
    within it); `temperature` is the one the engine sampled with, so the trainer's
    log-probs are of the same distribution.
    """

    def __init__(
        self,
        policy: nn.Module,
        cfg: TrainerConfig,
        *,
        group_size: int,
        temperature: float = 1.0,
        reference: nn.Module | None = None,
        process_group: dist.ProcessGroup | None = None,
        pad_id: int = 0,
        sharded: bool = False,
    ) -> None:
        """`sharded`: `policy` (and `reference`, if any) are FSDP2 modules over the ranks of
        `process_group`; the caller builds the reference before sharding (a sharded module
        cannot be deep-copied)."""
        self.policy, self.cfg, self.group_size = policy, cfg, group_size
        self.temperature, self.pad_id, self.group = temperature, pad_id, process_group
        self.sharded = sharded
        self.device = next(policy.parameters()).device
        if self.group is not None and not sharded:
            self._broadcast_parameters()  # before the reference copy: it must be rank 0's too
        self.optimizer = torch.optim.AdamW(
            policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        if reference is None and cfg.kl_coef > 0:
            if sharded:
                raise ValueError("kl_coef > 0 with a sharded policy: pass a sharded reference")
            reference = copy.deepcopy(policy)
        self.reference = None if reference is None else reference.requires_grad_(False).eval()
        self.step = 0
        self.rng = torch.Generator().manual_seed(cfg.seed + self._rank())

    # ------------------------------------------------------------ data parallel

    def _rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    def _broadcast_parameters(self) -> None:
        """Start every rank from group rank 0's weights, as DDP does."""
        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for p in self.policy.parameters():
                dist.broadcast(p.data, src=src, group=self.group)

    def _all_reduce_grads(self) -> None:
        """Average gradients over the group in one flat all-reduce."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= dist.get_world_size(self.group)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def _check_same_minibatch_count(self, count: int) -> None:
        """Ranks with different counts would wait on each other forever; fail together."""
        counts = torch.tensor([count, -count], dtype=torch.long, device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.group)
        if counts[0].item() != -counts[1].item():
            raise ValueError(
                f"data-parallel ranks have different minibatch counts "
                f"(min {-counts[1].item()}, max {counts[0].item()}); give every "
                f"rank the same number of rollouts"
            )

    def _has_tokens(self, mask: Tensor) -> bool:
        """Whether any rank's minibatch has a token in the loss (all ranks get the same answer,
        so they skip a minibatch together)."""
        count = mask.sum().reshape(1).to(torch.long)
        if self.group is not None:
            dist.all_reduce(count, group=self.group)
        return bool(count.item() > 0)

    # ------------------------------------------------------------ the step

    def advantages(self, rewards: Tensor) -> Tensor:
        if self.cfg.advantage == "grpo":
            return grpo_advantages(rewards, self.group_size)
        return baseline_advantages(rewards, self.group_size)

    def _logprobs(self, model: nn.Module, batch: PaddedBatch) -> Tensor:
        logits = model(batch.input_ids, batch.attention_mask)[:, :-1]
        return token_logprobs(logits / self.temperature, batch.targets)

    def _minibatches(self, n: int) -> list[Tensor]:
        size = self.cfg.minibatch_size
        order = torch.randperm(n, generator=self.rng)
        return [order[i : i + size] for i in range(0, n, size)]

    def train_step(self, batch: RolloutBatch, keep: list[bool] | None = None) -> dict[str, float]:
        """ppo_epochs x minibatches of clipped PPO on this batch; returns stats.

        Loss stats are means over the minibatch updates (see `ppo_loss`), plus `grad_norm`
        (before clipping), `reward_mean`, `entropy` (the sampler's mean negative log-prob of
        its own tokens, an estimate of the policy's entropy) and `step`.

        `keep` (one flag per sample; None keeps all): samples flagged False are not trained
        on: their tokens leave the loss mask, so they add no gradient. Their rewards still
        count in their group's advantage baseline (the groups stay whole). A minibatch with
        no token left on any rank is skipped (no optimizer step).
        """
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        adv = self.advantages(rewards).to(self.device)
        data = pad_batch(batch, self.pad_id, self.device)
        if keep is not None:
            data = drop_samples(data, keep)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self._logprobs(self.reference, data)
        self.policy.train()
        totals: dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.ppo_epochs):
            minibatches = self._minibatches(len(batch.prompts))
            if self.group is not None:
                self._check_same_minibatch_count(len(minibatches))
            for idx in minibatches:
                if keep is not None and not self._has_tokens(data.mask[idx]):
                    continue
                stats = self._update(data.select(idx), adv[idx], None if ref is None else ref[idx])
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        self.step += 1
        out = {k: v / max(count, 1) for k, v in totals.items()}
        entropy = -(data.old_logprobs * data.mask).sum() / data.mask.sum().clamp(min=1)
        out.update(reward_mean=rewards.mean().item(), entropy=entropy.item(), step=float(self.step))
        return out

    def _update(self, mb: PaddedBatch, adv: Tensor, ref: Tensor | None) -> dict[str, float]:
        new = self._logprobs(self.policy, mb)
        loss, stats = ppo_loss(
            new,
            mb.old_logprobs,
            adv,
            mb.mask,
            self.cfg.clip_eps,
            ref_logprobs=ref,
            kl_coef=self.cfg.kl_coef,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.group is not None and not self.sharded:
            self._all_reduce_grads()  # FSDP has reduce-scattered them already
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        return {"loss": loss.item(), "grad_norm": to_local_float(norm), **stats}


# ---------------------------------------------------------------- reference sampler


@torch.no_grad()
def generate(
    policy: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample completions (same-length prompts batched together); returns tokens, log-probs."""
    device = next(policy.parameters()).device
    completions: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for rows in by_len.values():
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(policy(ids)[:, -1] / temperature, dim=-1)
            tok = torch.multinomial(logp.exp().cpu(), 1, generator=generator).to(device)
            chosen = logp.gather(-1, tok).squeeze(-1).tolist()
            ids = torch.cat([ids, tok], dim=1)
            for j, i in enumerate(rows):
                completions[i].append(int(tok[j, 0]))
                logprobs[i].append(chosen[j])
    return completions, logprobs


def sample_rollouts(
    policy: nn.Module,
    task: Task,
    prompts_per_step: int,
    group_size: int,
    max_new_tokens: int,
    rng: random.Random,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> RolloutBatch:
    """Fresh prompts, `group_size` samples each (consecutive), scored by the task."""
    prompts = [p for p in task.sample_prompts(prompts_per_step, rng) for _ in range(group_size)]
    was_training = policy.training
    policy.eval()
    completions, logprobs = generate(policy, prompts, max_new_tokens, temperature, generator)
    policy.train(was_training)
    rewards = [task.reward(p, c) for p, c in zip(prompts, completions, strict=True)]
    return RolloutBatch(prompts, completions, logprobs, rewards)
