"""PPO/GRPO functions on tiny hand-computed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from trainer_side.rl.ppo import (
    ADV_EPS,
    baseline_advantages,
    grpo_advantages,
    k3_kl,
    masked_mean,
    ppo_loss,
    token_logprobs,
)

HALF = math.log(0.5)


def _new(ratios: list[list[float]]) -> torch.Tensor:
    """New log-probs whose ratio against old = log(0.5) is `ratios`."""
    return torch.log(torch.tensor(ratios) * 0.5).requires_grad_(True)


def test_token_logprobs_picks_the_target() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # [1, 2, 2]
    out = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.5)]]))
    assert out.dtype == torch.float32


def test_token_logprobs_of_bf16_logits_are_float32() -> None:
    logits = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    out = token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), math.log(0.25)))


def test_grpo_advantages_exact() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])
    s1, s2 = math.sqrt(0.125), math.sqrt(0.1875)  # population std of each group
    expected = [
        0.5 / (s1 + ADV_EPS),
        -0.5 / (s1 + ADV_EPS),
        0.0,
        0.0,
        *[-0.25 / (s2 + ADV_EPS)] * 3,
        0.75 / (s2 + ADV_EPS),
    ]
    torch.testing.assert_close(grpo_advantages(rewards, 4), torch.tensor(expected))


def test_grpo_advantages_equal_rewards_and_singletons_are_zero() -> None:
    assert torch.equal(grpo_advantages(torch.tensor([0.3, 0.3, 1.0, 1.0]), 2), torch.zeros(4))
    assert torch.equal(grpo_advantages(torch.tensor([0.3, 0.7]), 1), torch.zeros(2))


def test_baseline_advantages_exact() -> None:
    out = baseline_advantages(torch.tensor([1.0, 0.0, 0.25, 0.75]), 2)
    torch.testing.assert_close(out, torch.tensor([0.5, -0.5, -0.25, 0.25]))


@pytest.mark.parametrize("group_size", [0, 3])
def test_advantages_refuse_partial_groups(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.ones(4), group_size)


def test_ppo_loss_positive_advantage_clips_high_ratios() -> None:
    new = _new([[1.0, 1.5, 0.5, 2.0]])
    old = torch.full((1, 4), HALF)
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_loss(new, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    # per token: -min(r*A, clip(r)*A) = -1, -1.2 (clipped), -0.5; the 4th is masked out
    assert loss.item() == pytest.approx(-(1.0 + 1.2 + 0.5) / 3, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    # d/d new of -r*A is -r*A; zero where clipped or masked
    torch.testing.assert_close(new.grad, torch.tensor([[-1 / 3, 0.0, -0.5 / 3, 0.0]]))


def test_ppo_loss_negative_advantage_clips_low_ratios() -> None:
    new = _new([[1.0, 1.5, 0.5]])
    loss, stats = ppo_loss(
        new,
        torch.full((1, 3), HALF),
        torch.tensor([-1.0]),
        torch.ones(1, 3, dtype=torch.bool),
        clip_eps=0.2,
    )
    # -min(-1, -1) = 1, -min(-1.5, -1.2) = 1.5 (unclipped), -min(-0.5, -0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((1.0 + 1.5 + 0.8) / 3, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[1 / 3, 1.5 / 3, 0.0]]))


def test_ppo_loss_is_a_token_mean_over_the_batch() -> None:
    new = _new([[1.0, 1.5, 0.5, 9.0], [1.0, 1.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo_loss(new, torch.full((2, 4), HALF), torch.tensor([1.0, -1.0]), mask, 0.2)
    assert loss.item() == pytest.approx((-2.7 + 3.3) / 6, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 6)


def test_ppo_loss_inactive_clip_is_plain_policy_gradient() -> None:
    new = _new([[1.0, 1.1, 0.9]])
    adv = torch.tensor([[2.0, -1.0, 0.5]])  # per-token advantages
    loss, stats = ppo_loss(
        new, torch.full((1, 3), HALF), adv, torch.ones(1, 3, dtype=torch.bool), clip_eps=0.2
    )
    assert loss.item() == pytest.approx(-(2.0 - 1.1 + 0.45) / 3, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0


def test_ppo_loss_kl_penalty_uses_k3() -> None:
    new = _new([[1.0, 1.0]])
    ref = new.detach() + math.log(2.0)  # ref/p = 2 on every token
    k3 = 2.0 - math.log(2.0) - 1.0
    loss, stats = ppo_loss(
        new,
        torch.full((1, 2), HALF),
        torch.tensor([0.0]),
        torch.ones(1, 2, dtype=torch.bool),
        0.2,
        ref_logprobs=ref,
        kl_coef=0.1,
    )
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6)
    assert stats["kl_old"] == pytest.approx(0.0, abs=1e-7)


def test_k3_is_zero_at_equality_and_positive_elsewhere() -> None:
    p = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(k3_kl(p, p), torch.zeros(3))
    assert (k3_kl(p, p + torch.tensor([0.5, -0.5, 1.0])) > 0).all()


def test_masked_mean_of_an_empty_mask_is_zero() -> None:
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
