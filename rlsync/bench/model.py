"""The benchmark's model: a Llama-shaped (Qwen2 flavour: q/k/v biases) decoder of a given size,
its deterministic fp32 weights and its checkpoint on disk.

Sizing keeps the tensor mix realistic: a fixed number of layers (many small norms and
biases next to the big projections), a width solved from the byte budget, head_dim 64,
GQA with a quarter of the heads for K/V, a vocabulary of 8x the width, and the MLP width
tuned last so the total lands close to the requested bytes. Weights depend only on
(config, seed), so every process that rebuilds them (the pickle baseline runs in its own)
gets the same bytes. Knows nothing about transports or engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from rlsync.checkpoint_io import write_checkpoint
from rlsync.model_config import ModelConfig

GIB = 1 << 30
HEAD_DIM = 64
DEFAULT_LAYERS = 24
BYTES_PER_PARAM = 4  # fp32


def bench_model_config(size_gib: float, layers: int = DEFAULT_LAYERS) -> ModelConfig:
    """A Qwen2-style config whose fp32 weights take about `size_gib` GiB."""
    if size_gib <= 0 or layers <= 0:
        raise ValueError(f"size_gib={size_gib} and layers={layers} must be > 0")
    params = size_gib * GIB / BYTES_PER_PARAM
    # ~10.5 h^2 per layer (GQA attention 2.5 h^2 + MLP 8 h^2) + 16 h^2 for embed and head
    hidden = max(HEAD_DIM, round(math.sqrt(params / (10.5 * layers + 16)) / HEAD_DIM) * HEAD_DIM)
    heads = hidden // HEAD_DIM
    kv_heads = max(1, heads // 4)
    while heads % kv_heads:
        kv_heads -= 1
    cfg = _config(hidden, 32, layers, heads, kv_heads)
    fixed = param_count(cfg) - 3 * hidden * 32 * layers
    inter = max(32, round((params - fixed) / (3 * hidden * layers) / 32) * 32)
    return _config(hidden, inter, layers, heads, kv_heads)


def _config(hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2",
        vocab_size=8 * hidden,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )


def param_count(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in cfg.hf_parameter_shapes().values())


def make_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF name -> fp32 tensor, deterministic in (cfg, seed): norms near 1, biases small,
    matrices ~N(0, 0.5^2 / fan_in) so activations stay finite through every layer."""
    return dict(iter_weights(cfg, torch.Generator().manual_seed(seed)))


@torch.no_grad()
def iter_weights(cfg: ModelConfig, gen: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `make_weights`, one at a time (a sharded trainer keeps only its rows)."""
    for name, shape in cfg.hf_parameter_shapes().items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.mul_(0.05).add_(1.0)
        elif len(shape) == 1:
            t.mul_(0.02)
        else:
            t.mul_(0.5 / math.sqrt(shape[1]))
        yield name, t


def total_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_bench_checkpoint(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the weights as a Hugging Face checkpoint the engines start from."""
    write_checkpoint(path, cfg, tensors)
    return path


def describe(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """What the table header says about the model: bytes, tensor count, small tensors."""
    small = sum(1 for t in tensors.values() if t.numel() * t.element_size() < (1 << 20))
    return {
        "bytes": total_bytes(tensors),
        "tensors": len(tensors),
        "tensors_under_1mib": small,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab": cfg.vocab_size,
    }
