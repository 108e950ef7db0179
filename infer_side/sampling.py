"""Next-token sampling for a batch of requests, each with its own SamplingParams.

Per row: temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
then top-k (0 = off) keeps the k best, then top-p keeps the smallest set of the best tokens
whose renormalized mass reaches top_p; the token is drawn from the renormalized rest.

Logprobs (what PPO reads): for temperature > 0, the log-softmax of exactly the distribution
sampled from (after temperature, top-k and top-p, renormalized over the kept tokens). For
greedy rows the sampled distribution is a point mass (logprob 0, useless), so they report the
model's own log-softmax of the raw logits (temperature 1, no filtering).

Randomness is per request and per output position: the draw for token i of a request uses a
generator seeded from (request seed, i), so the same seed gives the same tokens whatever
else is in the batch, and a retracted request that restarts draws the same numbers again.
The draw is Gumbel-max (argmax of logp - log E, E ~ Exp(1)), exact sampling from softmax.
Nothing here knows about requests, the KV pool or the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsync.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit seed for draw `index` of a request seeded `seed` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
           positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
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
    noise = _exponential_noise(logp.shape[1], seeds, positions, greedy.tolist(), dev)
    drawn = (logp - noise.log()).argmax(dim=-1)
    drawn_logprobs = logp.gather(1, drawn[:, None]).squeeze(1)
    return torch.where(greedy, tokens, drawn), torch.where(greedy, logprobs, drawn_logprobs)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, then outside its top-p nucleus.

    top_k 0 and top_p 1 turn a filter off. The best token always survives.
    """
    use_k, use_p = top_k > 0, top_p < 1
    if not bool(use_k.any() or use_p.any()):
        return logits
    vocab = logits.shape[1]
    values, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= torch.where(use_k, top_k, vocab)[:, None]
    probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & use_p[:, None]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(1, order, values.masked_fill(drop, float("-inf")))


def _exponential_noise(vocab: int, seeds: Sequence[int], positions: Sequence[int],
                       skip: Sequence[bool], device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, vocab], row b drawn from its own (seed, position) generator."""
    noise = torch.ones((len(seeds), vocab), dtype=torch.float32, device=device)
    gen = torch.Generator(device=device)
    for b, (seed, pos) in enumerate(zip(seeds, positions, strict=True)):
        if not skip[b]:
            gen.manual_seed(mix_seed(seed, pos))
            noise[b].exponential_(generator=gen)
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)  # log(0) would pick a masked token
