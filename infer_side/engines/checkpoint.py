"""Load a Hugging Face safetensors checkpoint directory into a fresh `ModelWeights` store.

This is the engine's start-up path (and UpdateWeightsFromDisk's reader): unlike a weight
push, it may cast (a bf16 checkpoint into an fp32 store), because the store's dtype is the
engine's choice. It knows nothing about the model's forward, the KV pool or transports.
"""

from __future__ import annotations

from pathlib import Path

import torch

from infer_side.engines.weights import ModelWeights, WeightError
from rlsync.checkpoint_io import iter_checkpoint_tensors
from rlsync.model_config import DTYPES, ModelConfig, ModelConfigError

TIED_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def load_model(
    path: str | Path,
    dtype: str | None = None,
    device: torch.device | str = "cpu",
    *,
    exposed: bool = False,
) -> tuple[ModelConfig, ModelWeights]:
    """Read config.json (ModelConfig.from_dir: unsupported configs such as rope scaling raise
    ModelConfigError), allocate the store (`dtype` name, default the checkpoint's), and stream
    every tensor into it, cast to the store's dtype. `exposed`: in memory a pusher can map
    (`ModelWeights.empty`).

    A tied model's `lm_head.weight` is skipped only if it equals the embedding; any other
    unknown, duplicate or missing tensor raises WeightError naming it.
    """
    cfg = ModelConfig.from_dir(path)
    if dtype is not None and dtype not in DTYPES:
        raise ModelConfigError(f"dtype={dtype!r}: supported {sorted(DTYPES)}")
    weights = ModelWeights.empty(
        cfg, DTYPES[dtype] if dtype else cfg.dtype, device, exposed=exposed
    )
    tied_head: torch.Tensor | None = None
    seen: set[str] = set()
    for name, tensor in iter_checkpoint_tensors(path):
        if name == TIED_HEAD and cfg.tie_word_embeddings:
            tied_head = tensor
            continue
        if name in seen:
            raise WeightError(f"{name}: appears twice in checkpoint {path}")
        seen.add(name)
        weights.load([(name, tensor.to(weights.dtype))], complete=False)
    weights.validate([(n, *weights.expected()[n]) for n in seen], complete=True)
    if tied_head is not None:
        _check_tied_head(tied_head, weights)
    return cfg, weights


def _check_tied_head(head: torch.Tensor, weights: ModelWeights) -> None:
    embed = weights.embed_tokens
    if head.shape != embed.shape or not torch.equal(head.to(embed.device, embed.dtype), embed):
        raise WeightError(f"{TIED_HEAD}: differs from {EMBED} but tie_word_embeddings is true")
