"""PPO/GRPO math as pure functions: token log-probs, group advantages, the clipped loss.

Shapes: B sequences, T positions, V vocab. `mask` marks the tokens the loss counts (the
completion tokens); everything is reduced as a token-mean over the mask. The "old" log-probs
are the ones the inference engine sampled with, so the ratio also corrects for any drift
between the engine's numerics and the trainer's.

It knows nothing about models, optimizers, batches of rollouts or process groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADV_EPS = 1e-6


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b, t]) under logits[b, t] -> [B, T] float32 (caller aligns the shift)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size <= 0 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide the {rewards.numel()} rewards")
    return rewards.float().view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = ADV_EPS) -> Tensor:
    """(r - mean) / (std + eps) within each group of `group_size` consecutive samples.

    std is the population std (divide by group_size), so a group of one, or a group whose
    rewards are all equal, gets advantage 0.
    """
    g = _groups(rewards, group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, keepdim=True, correction=0)
    return ((g - mean) / (std + eps)).view(-1)


def baseline_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """r - mean within each group (no std scaling)."""
    g = _groups(rewards, group_size)
    return (g - g.mean(dim=1, keepdim=True)).view(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask's true entries (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(ref - p) - (ref - p) - 1 (always >= 0).
    Written as expm1(d) - d, which keeps the tiny values of nearly equal policies (in float32,
    exp(d) - d - 1 rounds to exactly 0 for |d| < ~1e-4)."""
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


def ppo_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate, token-mean over `mask`, plus kl_coef * k3 KL to a reference.

    new/old/ref log-probs and mask are [B, T]; advantages are [B] (one per sequence) or
    [B, T]. Per token: ratio = exp(new - old), loss = -min(ratio*A, clip(ratio)*A).
    Stats: `kl` (k3 to the reference, 0 without one), `kl_old` (k3 to the sampling
    log-probs), `clip_frac` (share of tokens whose gradient the clip removed), `ratio_mean`.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(new_logprobs.dtype)
    ratio = torch.exp(new_logprobs - old_logprobs)
    surr = ratio * advantages
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(surr, surr_clipped)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = k3_kl(new_logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "kl": masked_mean(kl.double(), mask).item(),
            "kl_old": masked_mean(k3_kl(new_logprobs.double(), old_logprobs.double()), mask).item(),
            "clip_frac": masked_mean((surr_clipped < surr).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats
