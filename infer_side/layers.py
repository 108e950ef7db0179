"""Stateless decoder math: RMSNorm, rotary embedding, and attention over a paged KV pool.

Plain functions of tensors. Attention over the pool is planned once per forward
(`plan_attention`: which slots each sequence reads, which keys each query may see) and run
per layer (`attend_paged`). Decode sequences (one new token) are padded into one batched
SDPA call; sequences with several new tokens (prefill, chunked prefill) run one SDPA call
each. Nothing here knows about weights storage, requests or the slot allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from infer_side.forward_batch import ForwardBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize in float32, scale in the input's dtype (Hugging Face's order of casts)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, 1, head_dim] for the rotate-half convention, computed in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class PrefillSeq:
    """One sequence with several new tokens: tokens [start, end) of the batch."""

    start: int
    end: int
    slots: torch.Tensor
    """[L] slots of the whole sequence."""
    mask: torch.Tensor | None
    """[n, L] bool, True where query may see key; None means plain causal (no cached prefix)."""


@dataclass
class AttentionPlan:
    """Everything attention needs about a batch, computed once and reused by every layer."""

    num_tokens: int
    last_token_index: torch.Tensor
    """[B] index of each sequence's last new token in the concatenated tokens."""
    decode_index: torch.Tensor | None = None
    """[Bd] token index of each one-new-token sequence; None when every sequence decodes."""
    decode_slots: torch.Tensor | None = None
    """[Bd, Lk] slots, right-padded with slot 0."""
    decode_mask: torch.Tensor | None = None
    """[Bd, 1, 1, Lk] bool, False on padding."""
    prefills: list[PrefillSeq] = field(default_factory=list)


def plan_attention(batch: ForwardBatch) -> AttentionPlan:
    """Validate the batch's bookkeeping and precompute slot gathers and masks."""
    lens = _check_batch(batch)
    device = batch.input_ids.device
    ends = torch.tensor(batch.new_lens, device=device).cumsum(0)
    plan = AttentionPlan(num_tokens=batch.input_ids.numel(), last_token_index=ends - 1)
    decode_rows, start = [], 0
    for b, (n, seq_len) in enumerate(zip(batch.new_lens, lens, strict=True)):
        if n == 1:
            decode_rows.append((start, b))
        else:
            plan.prefills.append(PrefillSeq(start, start + n, batch.seq_slots[b],
                                            _prefix_causal_mask(n, seq_len, device)))
        start += n
    if decode_rows:
        _plan_decode(plan, batch, lens, decode_rows)
    return plan


def _check_batch(batch: ForwardBatch) -> list[int]:
    t = batch.input_ids.numel()
    if len(batch.seq_slots) != len(batch.new_lens) or not batch.new_lens:
        raise ValueError(f"ForwardBatch: {len(batch.seq_slots)} seq_slots for "
                         f"{len(batch.new_lens)} new_lens (need equal, >= 1)")
    for field_name in ("positions", "out_slots"):
        if getattr(batch, field_name).numel() != t:
            raise ValueError(f"ForwardBatch.{field_name}: {getattr(batch, field_name).numel()} "
                             f"entries for {t} input_ids")
    if sum(batch.new_lens) != t:
        raise ValueError(f"ForwardBatch.new_lens: sum {sum(batch.new_lens)} != {t} input_ids")
    lens = [s.numel() for s in batch.seq_slots]
    for b, (n, seq_len) in enumerate(zip(batch.new_lens, lens, strict=True)):
        if not 1 <= n <= seq_len:
            raise ValueError(f"ForwardBatch sequence {b}: new_len {n} not in [1, {seq_len}]")
    return lens


def _prefix_causal_mask(n: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """New query i (of n) sits at position seq_len - n + i and sees keys up to it."""
    prefix = seq_len - n
    if prefix == 0:
        return None
    keys = torch.arange(seq_len, device=device)
    queries = torch.arange(n, device=device) + prefix
    return keys[None, :] <= queries[:, None]


def _plan_decode(plan: AttentionPlan, batch: ForwardBatch, lens: list[int],
                 rows: list[tuple[int, int]]) -> None:
    device = batch.input_ids.device
    seqs = [b for _, b in rows]
    plan.decode_slots = pad_sequence([batch.seq_slots[b] for b in seqs], batch_first=True)
    seq_lens = torch.tensor([lens[b] for b in seqs], device=device)
    keys = torch.arange(plan.decode_slots.shape[1], device=device)
    plan.decode_mask = (keys[None, :] < seq_lens[:, None])[:, None, None, :]
    if len(rows) != plan.num_tokens:
        plan.decode_index = torch.tensor([t for t, _ in rows], device=device)


def attend_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 plan: AttentionPlan) -> torch.Tensor:
    """q [T, H, d] over one layer's pools [slots, KV, d] -> [T, H, d] (new K/V already written)."""
    if plan.decode_slots is not None and plan.decode_index is None:
        return _attend_decode(q, k_pool, v_pool, plan)
    out = torch.empty_like(q)
    if plan.decode_slots is not None:
        out[plan.decode_index] = _attend_decode(q[plan.decode_index], k_pool, v_pool, plan)
    for seq in plan.prefills:
        k, v = k_pool[seq.slots], v_pool[seq.slots]
        out[seq.start:seq.end] = _sdpa_seq(q[seq.start:seq.end], k, v, seq.mask)
    return out


def _attend_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   plan: AttentionPlan) -> torch.Tensor:
    """One query per sequence. The G query heads sharing a kv head form that kv head's
    G-row query block, so grouped-query attention needs no repeated K/V."""
    bd, heads, d = q.shape
    kv_heads = k_pool.shape[1]
    k = k_pool[plan.decode_slots].transpose(1, 2)  # [Bd, KV, Lk, d]
    v = v_pool[plan.decode_slots].transpose(1, 2)
    qg = q.view(bd, kv_heads, heads // kv_heads, d)  # head h = kv * G + g, as in HF repeat_kv
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.decode_mask)
    return out.reshape(bd, heads, d)


def _sdpa_seq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """One sequence: q [n, H, d], k/v [L, KV, d] -> [n, H, d]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=mask is None)
    return out.transpose(0, 1)


def attend_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence over itself: q [T, H, d], k/v [T, KV, d]."""
    return _sdpa_seq(q, k, v, None)
