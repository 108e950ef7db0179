"""Tiny random Hugging Face checkpoints for tests, built by transformers itself.

transformers is the independent reference: a checkpoint it saves is what real users load,
and the model it loads back is what our engine and trainer must match. Nothing here knows
about rlsync's own model classes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
"""Default architecture: small enough for a 2-core CPU, big enough to catch layout bugs."""
ROPE_THETA = {"llama": 5000.0, "qwen2": 1_000_000.0}
"""Non-default thetas, so a loader that ignores the config's rope theta fails the tests."""


def make_hf_checkpoint(
    tmp_path: str | Path,
    *,
    model_type: str = "llama",
    tie: bool = False,
    kv_heads: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Build a tiny random Llama/Qwen2 with transformers, save it as safetensors, return the dir.

    Weights are re-drawn (norm weights near 1, biases and matrices ~N(0, 0.1^2) scaled by
    fan-in) so logits are far from uniform and greedy tokens vary. `overrides` go into the
    Hugging Face config (e.g. num_hidden_layers=1, rope_theta=1e4, hidden_size=64).
    """
    config = _hf_config(model_type, tie, kv_heads, overrides)
    torch.manual_seed(seed)
    model = _model_class(model_type)(config)
    _reinit(model, seed)
    model = model.to(dtype).eval()
    out = Path(tempfile.mkdtemp(prefix=f"hf-{model_type}-", dir=tmp_path))
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_hf_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model saved at `path`, in eval mode, on CPU (eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or "auto", attn_implementation="eager"
    )
    return model.eval()


def _hf_config(model_type: str, tie: bool, kv_heads: int, overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    kwargs: dict[str, Any] = {
        **TINY,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": tie,
        "rope_theta": ROPE_THETA.get(model_type, 10000.0),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    kwargs.update(overrides)
    if model_type == "llama":
        return LlamaConfig(**kwargs)
    if model_type == "qwen2":
        return Qwen2Config(use_sliding_window=False, **kwargs)
    raise ValueError(f"model_type={model_type!r}: tests build llama or qwen2")


def _model_class(model_type: str) -> type:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[model_type]


@torch.no_grad()
def _reinit(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name or name == "lm_head.weight":
            p.copy_(noise)
        else:
            p.copy_(2.0 * noise / p.shape[1] ** 0.5)
