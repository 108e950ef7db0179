"""Weight sync on GPUs: CUDA IPC from a trainer tensor on the GPU to an engine on the same GPU,
bit-exact and with device memory flat over 100 pushes; NCCL broadcast where two GPUs exist.
Skipped without CUDA (CI runs `-m "not gpu"`)."""

from __future__ import annotations

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.pusher import WeightPusher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=3)


def _push_many(ckpt, tmp_path, transport, device, engine_devices, pushes, **sync):
    """Push `pushes` versions; device memory (all processes: trainer, engines, IPC mappings)
    after the last push must not exceed what it was after the second (buffers warm)."""
    engines = {
        f"e{i}": launch_engine(ckpt, kv_tokens=512, device=d) for i, d in enumerate(engine_devices)
    }
    try:
        cfg = SyncConfig(transport=transport, bucket_mb=1.0, timeout_s=60.0, verify=True, **sync)
        pusher = WeightPusher(
            cfg, {n: c.endpoint for n, c in engines.items()}, tmp_path, device=device
        )
        try:
            for version in range(1, pushes + 1):
                tensors = {n: t.to(device) for n, t in trainer_weights(ckpt, version).items()}
                assert pusher.push(tensors, version).failed == []
                if version == 2:
                    torch.cuda.synchronize()
                    free_after_warmup = torch.cuda.mem_get_info(device)[0]
            torch.cuda.synchronize()
            assert torch.cuda.mem_get_info(device)[0] >= free_after_warmup - (16 << 20)
            assert pusher.mismatches(tensors) == {n: [] for n in engines}
            for client in engines.values():
                outs = client.generate(PROMPTS, greedy())
                assert {o.weight_version for o in outs} == {pushes} and all(
                    o.output_ids for o in outs
                )
        finally:
            pusher.close()
    finally:
        for client in engines.values():
            client.close()


@pytest.mark.parametrize("one_copy", [True, False])
@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_cuda_ipc_push_bit_exact_and_memory_flat(ckpt, tmp_path, load_mode, one_copy):
    """one_copy: the trainer writes the engine's own GPU store through its CUDA IPC handle;
    else through the trainer's shared buffer."""
    _push_many(
        ckpt,
        tmp_path,
        "ipc",
        "cuda:0",
        ["cuda:0"],
        pushes=100,
        load_mode=load_mode,
        one_copy=one_copy,
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL broadcast needs two GPUs")
def test_nccl_broadcast_to_engine_on_second_gpu(ckpt, tmp_path):
    _push_many(ckpt, tmp_path, "broadcast", "cuda:0", ["cuda:1"], pushes=5)


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_cuda_ipc_delta_chain_bit_exact(ckpt, tmp_path, load_mode):
    """sync.delta with the trainer's tensors and the engine on the GPU: payloads are encoded
    in host memory, written into the CUDA IPC buffer and applied on the device."""
    engine = launch_engine(ckpt, kv_tokens=512, device="cuda:0")
    try:
        cfg = SyncConfig(
            transport="ipc", bucket_mb=1.0, timeout_s=60.0, load_mode=load_mode, delta=True
        )
        pusher = WeightPusher(cfg, {"e0": engine.endpoint}, tmp_path, device="cuda:0")
        try:
            gen = torch.Generator().manual_seed(1)
            tensors = {n: t.to("cuda:0") for n, t in trainer_weights(ckpt, 1).items()}
            kinds = []
            for version in range(1, 8):
                if version > 1:  # ~1% of the elements move
                    for t in tensors.values():
                        hit = (torch.rand(t.shape, generator=gen) < 0.01).to(t.device)
                        t[hit] += 0.01
                kinds.append(pusher.push(tensors, version).delta)
                assert pusher.mismatches(tensors) == {"e0": []}
            assert kinds[1:] == ["delta"] * 6
        finally:
            pusher.close()
    finally:
        engine.close()
