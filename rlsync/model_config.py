"""Architecture of a Llama/Qwen2-style decoder, shared by the trainer's policy and the engine.

Both sides build the same architecture from this one value and name their parameters the
Hugging Face way, so a trainer state dict loads into the engine by name. It knows nothing
about how either side lays out its tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelConfigError(ValueError):
    """A model config we cannot build faithfully; the message names the key."""


@dataclass(kw_only=True)
class ModelConfig:
    """Hyper-parameters of the decoder; field names follow Hugging Face's config.json."""

    model_type: str = "llama"
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2 always does)."""
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"model_type={self.model_type!r}: supported {SUPPORTED_MODEL_TYPES}"
            )
        if self.model_type == "llama" and self.attention_bias:
            # HF Llama's attention_bias also puts a bias on o_proj, which neither side has
            raise ModelConfigError("attention_bias=True is not supported for llama (o_proj bias)")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ModelConfigError(f"{key} must be a positive int, got {getattr(self, key)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelConfigError("hidden_size must be divisible by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be a positive even int, got {self.head_dim}")
        if self.torch_dtype not in DTYPES:
            raise ModelConfigError(f"torch_dtype={self.torch_dtype!r}: supported {sorted(DTYPES)}")
        if self.model_type == "qwen2":
            self.attention_bias = True

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict; refuses what we would compute wrongly."""
        if raw.get("rope_scaling") not in (None, {}):
            raise ModelConfigError(f"rope_scaling={raw['rope_scaling']!r} is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act={raw['hidden_act']!r} is not supported (silu only)")
        if raw.get("mlp_bias", False):
            raise ModelConfigError("mlp_bias=True is not supported")
        if raw.get("use_sliding_window", False):
            raise ModelConfigError("use_sliding_window=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(_rope_theta(raw))
        kwargs.setdefault("num_key_value_heads", raw.get("num_attention_heads"))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        kwargs["torch_dtype"] = str(dtype).replace("torch.", "")
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ModelConfigError(f"{config_path} not found")
        return cls.from_hf_dict(json.loads(config_path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' Llama/Qwen2 classes load."""
        arch = "Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"
        out = dataclasses.asdict(self)
        out.update(
            architectures=[arch],
            hidden_act="silu",
            rope_scaling=None,
            attention_dropout=0.0,
            mlp_bias=False,
            use_cache=True,
            initializer_range=0.02,
            bos_token_id=None,
            eos_token_id=None,
        )
        if self.model_type == "qwen2":
            out.pop("attention_bias")
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
        return out

    def hf_parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face parameter name this architecture has, with its shape."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update(
                {
                    p + "input_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, q),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                }
            )
            if self.attention_bias:
                shapes.update(
                    {
                        p + "self_attn.q_proj.bias": (q,),
                        p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,),
                    }
                )
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


def _rope_theta(raw: dict[str, Any]) -> dict[str, float]:
    """rope_theta from a config.json: top-level (transformers < 5) or in `rope_parameters`
    (transformers >= 5 writes only that); anything but plain default rope is refused."""
    rope = raw.get("rope_parameters") or {}
    if not rope:
        return {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        raise ModelConfigError(f"rope_parameters={rope!r} is not supported (default rope only)")
    if "rope_theta" not in rope:
        return {}
    if "rope_theta" in raw and raw["rope_theta"] != rope["rope_theta"]:
        raise ModelConfigError(
            f"rope_theta={raw['rope_theta']} disagrees with rope_parameters={rope!r}"
        )
    return {"rope_theta": rope["rope_theta"]}
