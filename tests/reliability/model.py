"""A tiny model for the reliability tests, written without transformers (fast to build), and
the reference outputs a fresh in-process engine gives for a given set of weights.

Nothing here starts a process; `conftest.py` launches the engines.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlsync.checkpoint_io import write_checkpoint
from rlsync.model_config import ModelConfig
from rlsync.wire.protocol import SamplingParams
from tests.e2e.sync_helpers import run_core

TINY = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=5000.0,
)


def make_checkpoint(directory: Path, seed: int = 0, cfg: ModelConfig = TINY) -> Path:
    """A safetensors checkpoint with random weights (norms near 1, matrices ~ 1/sqrt(fan-in),
    so greedy tokens vary from prompt to prompt)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in cfg.hf_parameter_shapes().items():
        if len(shape) == 1:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    write_checkpoint(directory, cfg, tensors)
    return directory


def reference_outputs(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    prompts: list[list[int]],
    sampling: list[SamplingParams],
) -> list[list[int]]:
    """Output ids of a fresh engine holding exactly `tensors`, one list per prompt (any
    sampling params: seeded sampling is reproducible too)."""
    from infer_side.engines.native.engine_core import EngineCore
    from infer_side.engines.weights import ModelWeights
    from rlsync.config import EngineConfig
    from rlsync.wire.protocol import Generate

    dtype = next(iter(tensors.values())).dtype
    weights = ModelWeights.empty(cfg, dtype, torch.device("cpu"))
    weights.load([(n, t.to(dtype)) for n, t in tensors.items()])
    core = EngineCore(cfg, weights, EngineConfig(kv_tokens=4096, max_running=256))
    if all(s == sampling[0] for s in sampling) and sampling[0].temperature == 0:
        return [o.output_ids for o in run_core(core, prompts, sampling[0].max_new_tokens)]
    done: dict[str, list[int]] = {}
    for i, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
        core.process(Generate(request_id=f"ref{i}", input_ids=prompt, sampling=params))
    while len(done) < len(prompts):
        for out in core.step():
            if getattr(out, "finished", False):
                done[out.request_id] = out.output_ids
    return [done[f"ref{i}"] for i in range(len(prompts))]
