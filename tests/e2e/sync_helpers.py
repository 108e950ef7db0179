"""Shared pieces of the weight-sync tests: trainer weights, references, engine drivers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from infer_side.engines.native.engine_core import EngineCore
from infer_side.engines.weights import ModelWeights
from rlsync.checkpoint_io import iter_checkpoint_tensors
from rlsync.config import EngineConfig
from rlsync.model_config import ModelConfig
from rlsync.wire.protocol import Generate, GenerateOutput, SamplingParams

PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [3, 3, 3]]


def trainer_weights(ckpt: Path, version: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, perturbed by a version-dependent amount so every version
    differs in every tensor (as after an optimizer step)."""
    gen = torch.Generator().manual_seed(version)
    out = {}
    for name, t in iter_checkpoint_tensors(ckpt):
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.02
        out[name] = (t.float() + noise).to(t.dtype)
    return out


def reference_tokens(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    prompts: list[list[int]],
    max_new_tokens: int = 8,
    dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy tokens of a fresh in-process engine holding exactly `tensors`."""
    dtype = dtype or next(iter(tensors.values())).dtype
    weights = ModelWeights.empty(cfg, dtype, torch.device("cpu"))
    weights.load([(n, t.to(dtype)) for n, t in tensors.items()])
    core = EngineCore(cfg, weights, EngineConfig(kv_tokens=512))
    return [o.output_ids for o in run_core(core, prompts, max_new_tokens)]


def run_core(
    core: EngineCore, prompts: list[list[int]], max_new_tokens: int = 8
) -> list[GenerateOutput]:
    """Drive an in-process core until every prompt finished; outputs in prompt order."""
    rids = [f"r{i}-{os.urandom(4).hex()}" for i in range(len(prompts))]
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    done: dict[str, GenerateOutput] = {}
    for rid, prompt in zip(rids, prompts, strict=True):
        for out in core.process(Generate(request_id=rid, input_ids=prompt, sampling=sampling)):
            done[out.request_id] = out
    for _ in range(10_000):
        if len(done) == len(rids):
            break
        for out in core.step():
            if isinstance(out, GenerateOutput) and out.finished:
                done[out.request_id] = out
    return [done[r] for r in rids]


def greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def own_shm_segments() -> set[str]:
    """Shared-memory segments this process created (their names carry the creator's pid)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"rlsync-{os.getpid()}-")}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
