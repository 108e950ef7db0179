"""The policy: a Llama/Qwen2 decoder in its training form, with Hugging Face parameter names.

`LlamaPolicy.named_parameters()` yields exactly `ModelConfig.hf_parameter_shapes()` (names
and shapes), so the trainer's weights load into the engine, or into transformers, by name.
The math follows Hugging Face's Llama/Qwen2: RMSNorm, rotate-half RoPE, grouped-query
attention (optional q/k/v bias), SwiGLU MLP; logits come back in float32.

It knows nothing about PPO, about how weights travel to engines, or about the engine's own
(fused) layout; checkpoints are read and written through `rlsync.checkpoint_io`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlsync.checkpoint_io import iter_checkpoint_tensors, write_checkpoint
from rlsync.model_config import ModelConfig, ModelConfigError

INIT_STD = 0.02


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Hugging Face does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, head_dim] for positions 0..T-1 (rotate-half layout)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D] by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = int(cfg.head_dim or 0)
        self.q_proj = nn.Linear(h, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)

    def _share_kv(self, x: Tensor) -> Tensor:
        """[B, kv_heads, T, D] -> [B, heads, T, D]: each kv head serves `heads // kv_heads`.

        Shared heads stay an expanded view and unshared ones are made contiguous: the memory
        layout transformers' eager path hands its matmul, so float32 rounding matches too.
        """
        b, kvh, t, d = x.shape
        groups = self.heads // kvh
        if groups == 1:
            return x.contiguous()
        return x[:, :, None].expand(b, kvh, groups, t, d).reshape(b, kvh * groups, t, d)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self._share_kv(k), self._share_kv(v)
        # Plain matmul-softmax-matmul (softmax in float32), as transformers' eager path does,
        # rather than a fused kernel whose rounding differs.
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embeddings, the layer stack and the final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_allowed(
    attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device
) -> Tensor:
    """Bool [B, 1, T, T]: causal, padded keys hidden; the diagonal stays so no row is empty."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal.expand(batch, 1, seq_len, seq_len)
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    return (causal & keys) | eye


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a checkpoint dir, also from transformers >= 5's `rope_parameters`.

    TODO(model_config owner): `ModelConfig.from_hf_dict` ignores `rope_parameters` (and would
    silently use the default theta); once it reads them, this is `ModelConfig.from_dir`.
    """
    raw: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    rope = raw.pop("rope_parameters", None)
    if rope is not None:
        if (
            not isinstance(rope, dict)
            or rope.get("rope_type", "default") != "default"
            or set(rope) - {"rope_type", "rope_theta"}
        ):
            raise ModelConfigError(f"rope_parameters={rope!r}: only default rope is supported")
        raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if raw["rope_theta"] != rope.get("rope_theta", raw["rope_theta"]):
            raise ModelConfigError(
                f"rope_theta={raw['rope_theta']} disagrees with rope_parameters={rope!r}"
            )
    return ModelConfig.from_hf_dict(raw)


class LlamaPolicy(nn.Module):
    """Llama/Qwen2 causal LM whose parameter names are exactly Hugging Face's.

    With tied embeddings `lm_head.weight` is the embedding's Parameter, so
    `named_parameters()` yields it once, as `model.embed_tokens.weight`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids [B, T] (padding on the right) -> float32 logits [B, T, V]."""
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(
            t, int(self.cfg.head_dim or 0), self.cfg.rope_theta, x.device, x.dtype
        )
        allowed = attention_allowed(attention_mask, b, t, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, allowed)
        return self.lm_head(self.model.norm(x)).float()

    def hf_tensors(self) -> dict[str, Tensor]:
        """Detached parameters by Hugging Face name (tied lm_head not repeated)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        seed: int = 0,
        *,
        init_std: float = INIT_STD,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LlamaPolicy:
        """Random init, reproducible from `seed`: N(0, init_std) matrices, unit norms, zero biases."""
        policy = cls(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * init_std)
        return policy.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> LlamaPolicy:
        """Load a Hugging Face checkpoint directory; every parameter must be present."""
        cfg = read_config(path)
        policy = cls(cfg).to(dtype=dtype)
        params = dict(policy.named_parameters())
        seen: set[str] = set()
        with torch.no_grad():
            for name, tensor in iter_checkpoint_tensors(path):
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                if name not in params:
                    raise KeyError(f"{path}: unexpected tensor {name!r}")
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
                seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise KeyError(f"{path}: missing tensors {missing[:5]}")
        return policy.to(device=device)

    def save_pretrained(self, path: str | Path, tensors: dict[str, Tensor] | None = None) -> Path:
        """Write config.json + safetensors that transformers' AutoModelForCausalLM loads.

        Tensors are written in the config's `torch_dtype`, so file and config agree.
        `tensors`: the whole tensors to write instead of this module's own (an FSDP rank's
        parameters are shards; the caller gathers them).
        """
        source = self.hf_tensors() if tensors is None else tensors
        tensors = {name: t.to(self.cfg.dtype) for name, t in source.items()}
        write_checkpoint(path, self.cfg, tensors)
        return Path(path)
