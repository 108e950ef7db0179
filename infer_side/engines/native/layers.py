"""Stateless decoder math: RMSNorm, rotary embedding, and attention over a paged KV pool.

Plain functions of tensors. Attention over the pool is planned once per forward
(`plan_attention`: which slots each sequence reads, which keys each query may see) and run
per layer (`attend_paged`). Decode sequences (one new token) are padded into one batched
SDPA call; sequences with several new tokens (prefill, chunked prefill) run one SDPA call
each. Nothing here knows about weights storage, requests or the slot allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from infer_side.engines.native.forward_batch import ForwardBatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize in float32, scale in the input's dtype (Hugging Face's order of casts)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
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
class PaddedGroup:
    """Sequences attended in one SDPA call: queries right-padded to `q_len`, keys to Lk."""

    q_len: int
    slots: torch.Tensor
    """[Bg, Lk] slots of each whole sequence, right-padded with slot 0."""
    mask: torch.Tensor
    """[Bg, 1, G*q_len or 1, Lk] bool: True where a query may see a key (G query heads per kv)."""
    token_index: torch.Tensor | None
    """[Tg] this group's tokens in the batch; None when the group is the whole batch, in order."""
    pad_index: torch.Tensor | None
    """[Tg] each token's row in the padded [Bg * q_len] layout; None when q_len == 1."""


@dataclass
class SingleSeq:
    """A sequence with many new tokens, attended alone (padding it with others would waste)."""

    start: int
    end: int
    slots: torch.Tensor
    mask: torch.Tensor | None
    """[n, L] bool; None means plain causal (no cached prefix)."""


@dataclass
class AttentionPlan:
    """Everything attention needs about a batch, computed once and reused by every layer."""

    last_token_index: torch.Tensor
    """[B] index of each sequence's last new token in the concatenated tokens."""
    groups: list[PaddedGroup] = field(default_factory=list)
    singles: list[SingleSeq] = field(default_factory=list)


@dataclass
class _Seq:
    index: int
    start: int
    new: int
    length: int


PAD_WASTE_LIMIT = 2.0
"""Prefills share one padded call while padded query*key area <= this times the real area."""


def plan_attention(batch: ForwardBatch, query_groups: int = 1) -> AttentionPlan:
    """Validate the batch's bookkeeping and precompute slot tables and masks.

    Decode sequences (one new token) form one padded group; sequences with several new
    tokens form a second group, or run one by one when padding them together would waste.
    `query_groups` is num_attention_heads // num_key_value_heads.
    """
    lens = _check_batch(batch)
    device = batch.input_ids.device
    ends = list(accumulate(batch.new_lens))
    plan = AttentionPlan(last_token_index=torch.tensor(ends, device=device) - 1)
    starts = [e - n for e, n in zip(ends, batch.new_lens, strict=True)]
    seqs = [
        _Seq(b, st, n, ln)
        for b, (st, n, ln) in enumerate(zip(starts, batch.new_lens, lens, strict=True))
    ]
    decodes = [s for s in seqs if s.new == 1]
    prefills = [s for s in seqs if s.new > 1]
    whole = len(decodes) == len(seqs)
    if decodes:
        plan.groups.append(_padded_group(batch, decodes, query_groups, whole))
    if _padding_is_cheap(prefills):
        plan.groups.append(_padded_group(batch, prefills, query_groups, False))
    else:
        plan.singles = [
            SingleSeq(
                s.start,
                s.start + s.new,
                batch.seq_slots[s.index],
                _causal_mask(s.new, s.length, device),
            )
            for s in prefills
        ]
    return plan


def _check_batch(batch: ForwardBatch) -> list[int]:
    t = batch.input_ids.numel()
    if len(batch.seq_slots) != len(batch.new_lens) or not batch.new_lens:
        raise ValueError(
            f"ForwardBatch: {len(batch.seq_slots)} seq_slots for "
            f"{len(batch.new_lens)} new_lens (need equal, >= 1)"
        )
    for field_name in ("positions", "out_slots"):
        if getattr(batch, field_name).numel() != t:
            raise ValueError(
                f"ForwardBatch.{field_name}: {getattr(batch, field_name).numel()} "
                f"entries for {t} input_ids"
            )
    if sum(batch.new_lens) != t:
        raise ValueError(f"ForwardBatch.new_lens: sum {sum(batch.new_lens)} != {t} input_ids")
    lens = [s.numel() for s in batch.seq_slots]
    for b, (n, seq_len) in enumerate(zip(batch.new_lens, lens, strict=True)):
        if not 1 <= n <= seq_len:
            raise ValueError(f"ForwardBatch sequence {b}: new_len {n} not in [1, {seq_len}]")
    return lens


def _padding_is_cheap(seqs: list[_Seq]) -> bool:
    if len(seqs) < 2:
        return len(seqs) == 1
    padded = len(seqs) * max(s.new for s in seqs) * max(s.length for s in seqs)
    return padded <= PAD_WASTE_LIMIT * sum(s.new * s.length for s in seqs)


def _causal_mask(n: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """New query i (of n) sits at position seq_len - n + i and sees keys up to it."""
    if n == seq_len:
        return None
    keys = torch.arange(seq_len, device=device)
    return keys[None, :] <= torch.arange(seq_len - n, seq_len, device=device)[:, None]


def _padded_group(
    batch: ForwardBatch, seqs: list[_Seq], query_groups: int, whole: bool
) -> PaddedGroup:
    device = batch.input_ids.device
    q_len = max(s.new for s in seqs)
    slots = pad_sequence([batch.seq_slots[s.index] for s in seqs], batch_first=True)
    length = torch.tensor([s.length for s in seqs], device=device)[:, None, None]
    last_query = length - q_len + torch.arange(q_len, device=device)[None, :, None]
    keys = torch.arange(slots.shape[1], device=device)[None, None, :]
    # Queries are left-padded: row i of a sequence with n new tokens is real when
    # i >= q_len - n, which keeps the causal offset one formula. Every real row sees key 0;
    # padded rows are also let see it, so no row is fully masked (that would give NaN).
    mask = ((keys < length) & (keys <= last_query)) | (keys == 0)  # [Bg, q_len, Lk]
    if q_len > 1:
        mask = mask[:, None].expand(-1, query_groups, -1, -1).reshape(len(seqs), -1, mask.shape[-1])
    group = PaddedGroup(q_len, slots, mask[:, None], None, None)
    if not whole:
        group.token_index = torch.tensor(
            [t for s in seqs for t in range(s.start, s.start + s.new)], device=device
        )
    if q_len > 1:
        group.pad_index = torch.tensor(
            [r * q_len + i for r, s in enumerate(seqs) for i in range(q_len - s.new, q_len)],
            device=device,
        )
    return group


def attend_paged(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """q [T, H, d] over one layer's pools [slots, KV, d] -> [T, H, d] (new K/V already written)."""
    if len(plan.groups) == 1 and plan.groups[0].token_index is None:
        return _attend_group(q, k_pool, v_pool, plan.groups[0])
    out = torch.empty_like(q)
    for group in plan.groups:
        rows = q.index_select(0, group.token_index)
        out.index_copy_(0, group.token_index, _attend_group(rows, k_pool, v_pool, group))
    for seq in plan.singles:
        k, v = k_pool.index_select(0, seq.slots), v_pool.index_select(0, seq.slots)
        out[seq.start : seq.end] = _sdpa_seq(q[seq.start : seq.end], k, v, seq.mask)
    return out


def _attend_group(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, group: PaddedGroup
) -> torch.Tensor:
    """One SDPA call for a padded group. The G query heads that share a kv head are stacked
    as that kv head's G*q_len query rows, so grouped-query attention repeats no K/V."""
    heads, d = q.shape[1:]
    bg, kv_heads, q_len = group.slots.shape[0], k_pool.shape[1], group.q_len
    g = heads // kv_heads  # head h = kv * g + j, as in Hugging Face's repeat_kv
    if group.pad_index is not None:
        q = q.new_zeros(bg * q_len, heads, d).index_copy_(0, group.pad_index, q)
    qg = (
        q.view(bg, q_len, kv_heads, g, d).permute(0, 2, 3, 1, 4).reshape(bg, kv_heads, g * q_len, d)
    )
    k = _gather(k_pool, group.slots).transpose(1, 2)  # [Bg, KV, Lk, d]
    v = _gather(v_pool, group.slots).transpose(1, 2)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask)
    out = out.view(bg, kv_heads, g, q_len, d).permute(0, 3, 1, 2, 4).reshape(bg * q_len, heads, d)
    return out if group.pad_index is None else out.index_select(0, group.pad_index)


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool[slots] for a 2-D slot table; index_select is several times faster on CPU."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


def _sdpa_seq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One sequence: q [n, H, d], k/v [L, KV, d] -> [n, H, d]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        is_causal=mask is None,
    )
    return out.transpose(0, 1)


def attend_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one whole sequence over itself: q [T, H, d], k/v [T, KV, d]."""
    return _sdpa_seq(q, k, v, None)
