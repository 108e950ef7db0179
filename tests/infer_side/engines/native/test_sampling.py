"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, and the logprobs reported."""

from __future__ import annotations

import math

import pytest
import torch

from infer_side.engines.native.sampling import filter_top_k_top_p, mix_seed, sample
from rlsync.wire.protocol import SamplingParams

VOCAB = 12


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_with_model_logprob():
    x = logits(4)
    tokens, lps = sample(x, [SamplingParams()] * 4, [0] * 4, [0] * 4)
    assert tokens.tolist() == x.argmax(-1).tolist()
    expected = torch.log_softmax(x, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.equal(lps, expected)


def test_top_k_one_equals_greedy_token():
    x = logits(6, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(6)]
    tokens, lps = sample(x, params, list(range(6)), [3] * 6)
    assert tokens.tolist() == x.argmax(-1).tolist()
    assert lps.tolist() == [0.0] * 6  # the sampled distribution is a point mass


def test_same_seed_same_token_whatever_the_batch():
    x = logits(5, seed=2)
    p = SamplingParams(temperature=1.0, seed=7)
    alone, alone_lp = sample(x[2:3], [p], [7], [4])
    other = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(),
        p,
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(temperature=1.0),
    ]
    batched, batched_lp = sample(x, other, [1, 2, 7, 3, 4], [0, 9, 4, 1, 2])
    assert batched[2] == alone[0] and batched_lp[2] == alone_lp[0]


def test_different_positions_draw_differently():
    x = torch.zeros(1, VOCAB)  # uniform: the token is pure noise
    p = [SamplingParams(temperature=1.0)]
    draws = {int(sample(x, p, [3], [i])[0]) for i in range(40)}
    assert len(draws) > 5


def test_mix_seed_spreads_and_fits_63_bits():
    seeds = {mix_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 1 << 63 for s in seeds)


def test_temperature_sampling_follows_softmax():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=2.0)
    n = 4000
    tokens, _ = sample(x.expand(n, 4), [p] * n, [11] * n, list(range(n)))
    counts = torch.bincount(tokens, minlength=4).float()
    expected = torch.softmax(x[0] / 2.0, -1)
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_logprob_is_of_the_filtered_renormalized_distribution():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=0.5, top_k=3)
    token, lp = sample(x, [p], [5], [0])
    kept = torch.softmax(x[0, :3] / 0.5, -1)
    assert token.item() < 3
    assert math.isclose(lp.item(), math.log(kept[token.item()]), rel_tol=1e-5)


def test_top_k_limits_support():
    x = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    p = SamplingParams(temperature=1.0, top_k=2)
    seen = set(sample(x.expand(200, 6), [p] * 200, [1] * 200, list(range(200)))[0].tolist())
    assert seen == {4, 5}


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_k_top_p(probs.log(), torch.tensor([0]), torch.tensor([0.8]))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    out = filter_top_k_top_p(probs.log(), torch.tensor([0]), torch.tensor([0.81]))
    assert torch.isfinite(out[0, :3]).all() and torch.isinf(out[0, 3])


def test_top_p_zero_keeps_best_and_top_p_one_is_off():
    x = logits(2, seed=3)
    out = filter_top_k_top_p(x, torch.tensor([0, 0]), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(out[0]).sum() == 1 and out[0].argmax() == x[0].argmax()
    assert torch.equal(out[1], x[1])


def test_top_k_then_top_p_on_renormalized_mass():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # After top-k=2 the kept mass renormalizes to [4/7, 3/7]; top_p=0.5 keeps only the best.
    out = filter_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_filters_off_return_input_unchanged():
    x = logits(3)
    assert filter_top_k_top_p(x, torch.zeros(3, dtype=torch.int64), torch.ones(3)) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accepts_low_precision_logits(dtype):
    x = logits(2).to(dtype)
    tokens, lps = sample(x, [SamplingParams(), SamplingParams(temperature=1.0)], [0, 1], [0, 0])
    assert tokens.dtype == torch.int64 and lps.dtype == torch.float32
    assert tokens[0] == x.float()[0].argmax()
