"""The vLLM backend on a GPU (the `vllm` package, CUDA): CUDA IPC from a trainer tensor on the
GPU and NCCL broadcast into a vLLM engine on the same machine, tokens equal transformers on
the new weights. Skipped without CUDA (CI runs `-m "not gpu"`)."""

from __future__ import annotations

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import trainer_weights
from tests.e2e.test_vllm_backend import ARCH, PROMPT, greedy, hf_greedy
from trainer_side.sync.pusher import WeightPusher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("transport", ["ipc", "broadcast"])
@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_push_from_gpu_into_vllm_on_cuda(tmp_path, transport, load_mode):
    if transport == "broadcast" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the engine on a second GPU")
    device = "cuda:1" if transport == "broadcast" else "cuda"
    ckpt = make_hf_checkpoint(tmp_path, kv_heads=1, seed=4, **ARCH)
    engine = launch_engine(ckpt, backend="vllm", device=device, kv_tokens=256, start_timeout_s=600)
    try:
        cfg = SyncConfig(transport=transport, load_mode=load_mode, bucket_mb=0.05, timeout_s=120)
        pusher = WeightPusher(cfg, {"vllm": engine.endpoint}, tmp_path, device="cuda")
        try:
            for version in (1, 2):
                tensors = {n: t.cuda() for n, t in trainer_weights(ckpt, version).items()}
                assert pusher.push(tensors, version).failed == []
            assert pusher.mismatches(tensors) == {"vllm": []}
        finally:
            pusher.close()
        cpu = {n: t.cpu() for n, t in tensors.items()}
        (out,) = engine.generate([PROMPT], greedy(6))
        assert out.output_ids == hf_greedy(ckpt, cpu, PROMPT, 6)[0] and out.weight_version == 2
    finally:
        engine.close()
