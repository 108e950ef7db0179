"""Next-token sampling for a batch of requests, each with its own SamplingParams.

Per row: temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
then top-k (0 = off) keeps the k best, then top-p keeps the smallest set of the best tokens
whose renormalized mass reaches top_p; the token is drawn from the renormalized rest.

Logprobs (what PPO reads): for temperature > 0, the log-softmax of exactly the distribution
sampled from (after temperature, top-k and top-p, renormalized over the kept tokens). For
greedy rows the sampled distribution is a point mass (logprob 0, useless), so they report the
model's own log-softmax of the raw logits (temperature 1, no filtering).

Randomness is per request and per output position, counter-based instead of a stateful
torch.Generator: the draw for output token i of a request is a uniform number hashed from
(request seed, i) (splitmix64), turned into a token by inverse-CDF over the probabilities.
So the same seed gives the same tokens whatever else is in the batch, a retracted request
that restarts draws the same numbers again, and no generator state lives on any device.
Nothing here knows about requests, the KV pool or the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsync.wire.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit seed for draw `index` of a request seeded `seed` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def uniform(seed: int, index: int) -> float:
    """The request's uniform draw in [0, 1) for output token `index` (53 random bits)."""
    return (mix_seed(seed, index) >> 10) / float(1 << 53)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    positions: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] int64 and their logprobs [B] float32 for logits [B, vocab].

    `seeds[b]` is row b's request seed, `positions[b]` the index of the output token drawn.
    """
    logits = logits.float()
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    greedy = temps == 0
    tokens = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    if bool(greedy.all()):
        return tokens, logprobs
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
    logp = torch.log_softmax(filter_top_k_top_p(scaled, top_k, top_p), dim=-1)
    u = torch.tensor(
        [uniform(s, i) for s, i in zip(seeds, positions, strict=True)],
        dtype=torch.float64,
        device=dev,
    )
    drawn = _inverse_cdf(logp.exp(), u)
    drawn_logprobs = logp.gather(1, drawn[:, None]).squeeze(1)
    return torch.where(greedy, tokens, drawn), torch.where(greedy, logprobs, drawn_logprobs)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row b's token: the first whose cumulative probability exceeds u[b] (never a 0-prob one)."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return torch.where(index < probs.shape[1], index, probs.argmax(dim=-1))  # u*total rounded up


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus.

    top_k 0 and top_p 1 turn a filter off; rows with both off come back untouched. The best
    token always survives. Only the rows that filter are sorted, and only as deep as needed.
    """
    use_k, use_p = top_k > 0, top_p < 1
    rows = (use_k | use_p).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    vocab = logits.shape[1]
    k = torch.where(use_k, top_k, vocab).clamp(max=vocab)[rows]
    values, order = logits[rows].topk(int(k.max()), dim=-1)  # sorted, best first
    ranks = torch.arange(values.shape[1], device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[rows, None]) & use_p[rows, None]
    drop[:, 0] = False
    kept = torch.full_like(logits[rows], float("-inf"))
    kept.scatter_(1, order, values.masked_fill(drop, float("-inf")))
    out = logits.clone()
    out[rows] = kept
    return out
