"""The engine's Llama/Qwen2 decoder: paged-KV forward over a ForwardBatch, and a full recompute.

The model reads its tensors from a swappable `ModelWeights` at every forward, so the engine
can swap in a shadow store between steps. It writes each new token's K/V into the slots the
scheduler chose and attends over each sequence's slots; it knows nothing about requests,
the slot allocator, sampling or where the weights came from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from infer_side.engines.native.forward_batch import ForwardBatch
from infer_side.engines.native.layers import (
    AttentionPlan,
    apply_rope,
    attend_full,
    attend_paged,
    plan_attention,
    rms_norm,
    rope_cos_sin,
)
from infer_side.engines.weights import LayerWeights, ModelWeights
from rlsync.model_config import ModelConfig

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, q [T, H, d], k [T, KV, d], v [T, KV, d]) -> attention output [T, H, d]."""


def kv_cache_shape(cfg: ModelConfig, num_slots: int) -> tuple[int, int, int, int]:
    """[num_layers, num_slots, num_kv_heads, head_dim]: the layout ForwardBatch assumes."""
    assert cfg.head_dim is not None
    return (cfg.num_hidden_layers, num_slots, cfg.num_key_value_heads, cfg.head_dim)


def allocate_kv_cache(
    cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed K and V pools: normal tensors even under inference_mode, so the engine may
    reset them in place anywhere."""
    if num_slots <= 0:
        raise ValueError(f"num_slots must be > 0, got {num_slots}")
    shape = kv_cache_shape(cfg, num_slots)
    with torch.inference_mode(False):
        return (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )


class LlamaForInference:
    """A Llama/Qwen2 decoder that computes with whatever `ModelWeights` it holds right now.

    Why a plain class and not nn.Module: the weights are not parameters the model owns but a
    store the engine swaps (live <-> shadow) between steps; `self.weights = other` is the swap.
    Supports GQA (any kv-head count dividing the heads), qkv bias (Qwen2), tied embeddings.
    """

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg = cfg
        self.weights = weights

    @property
    def weights(self) -> ModelWeights:
        return self._weights

    @weights.setter
    def weights(self, weights: ModelWeights) -> None:
        if weights.cfg.hf_parameter_shapes() != self.cfg.hf_parameter_shapes():
            raise ValueError("weights were built for a different architecture than this model")
        self._weights = weights

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Float32 logits [B, vocab] at each sequence's last new token.

        Writes the new tokens' K (after RoPE) and V into `batch.out_slots`, then lets each
        sequence's new tokens attend causally over all of its `seq_slots`. RoPE uses
        `batch.positions` (the scheduler keeps them equal to each token's index in its
        sequence); causality follows the order of `seq_slots`. Every batch tensor must be on
        the weights' device.
        """
        self._check_pools(k_cache, v_cache)
        if batch.input_ids.device != self.weights.device:
            raise ValueError(
                f"ForwardBatch.input_ids on {batch.input_ids.device}, "
                f"weights on {self.weights.device}"
            )
        plan = plan_attention(batch, self.cfg.num_attention_heads // self.cfg.num_key_value_heads)
        hidden = self._run_layers(
            batch.input_ids,
            batch.positions,
            lambda n, q, k, v: self._attend_paged(n, q, k, v, batch, plan, k_cache, v_cache),
        )
        return self._logits(hidden[plan.last_token_index])

    @torch.inference_mode()
    def forward_full(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, vocab] for one sequence, recomputed from scratch (no KV pool)."""
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids: expected a non-empty 1-D tensor, got {list(input_ids.shape)}"
            )
        positions = torch.arange(input_ids.numel(), device=input_ids.device)
        hidden = self._run_layers(input_ids, positions, lambda n, q, k, v: attend_full(q, k, v))
        return self._logits(hidden)

    __call__ = forward

    # ------------------------------------------------------------------ internals

    def _attend_paged(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        plan: AttentionPlan,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        k_pool, v_pool = k_cache[layer], v_cache[layer]
        k_pool.index_copy_(0, batch.out_slots, k)
        v_pool.index_copy_(0, batch.out_slots, v)
        return attend_paged(q, k_pool, v_pool, plan)

    def _run_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        cfg, w = self.cfg, self.weights
        hidden = F.embedding(input_ids, w.embed_tokens)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, w.dtype)
        for n, layer in enumerate(w.layers):
            hidden = hidden + self._attention(n, layer, hidden, cos, sin, attend)
            hidden = hidden + self._mlp(layer, hidden)
        return hidden

    def _attention(
        self,
        n: int,
        layer: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        cfg = self.cfg
        x = rms_norm(hidden, layer.input_layernorm, cfg.rms_norm_eps)
        qkv = F.linear(x, layer.qkv_proj, layer.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        t = hidden.shape[0]
        q = apply_rope(q.view(t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
        out = attend(n, q, k, v)
        return F.linear(out.reshape(t, cfg.q_size), layer.o_proj)

    def _mlp(self, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_norm(hidden, layer.post_attention_layernorm, self.cfg.rms_norm_eps)
        gate, up = F.linear(x, layer.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down_proj)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weights
        x = rms_norm(hidden, w.norm, self.cfg.rms_norm_eps)
        return F.linear(x, w.lm_head_weight).float()

    def _check_pools(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        w = self.weights
        for name, pool in (("k_cache", k_cache), ("v_cache", v_cache)):
            if (
                pool.dim() != 4
                or pool.shape[0] != self.cfg.num_hidden_layers
                or tuple(pool.shape[2:]) != kv_cache_shape(self.cfg, 1)[2:]
            ):
                raise ValueError(
                    f"{name}: shape {list(pool.shape)}, expected "
                    f"{list(kv_cache_shape(self.cfg, pool.shape[1]))}"
                )
            if pool.dtype != w.dtype or pool.device != w.device:
                raise ValueError(
                    f"{name}: {pool.dtype} on {pool.device}, weights are {w.dtype} on {w.device}"
                )
