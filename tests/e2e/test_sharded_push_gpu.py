"""FSDP2 trainers on GPUs (NCCL) push to an engine on the GPU: each rank's policy on its own
GPU, sharded by `fully_shard`, pushed by gather-to-rank-0 (the path `fsdp_push: auto` takes
on CUDA: the sharded writes are CPU shared memory only for now) over CUDA IPC, bit-exact.
One rank per GPU; skipped without CUDA (CI runs `-m "not gpu"`)."""

from __future__ import annotations

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.shard_procs import host_store, run_ranks
from tests.e2e.test_sharded_push import expected_fingerprints

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_fsdp_ranks_on_gpus_push_bit_exact_by_gather(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path, tie=True, seed=3, vocab_size=99, intermediate_size=70)
    world = min(torch.cuda.device_count(), 2)
    engine = launch_engine(ckpt, kv_tokens=512, device="cuda:0")
    try:
        results = run_ranks(
            world,
            host_store(),
            ckpt,
            {"engine0": engine.endpoint},
            SyncConfig(transport="ipc", bucket_mb=0.02, timeout_s=60.0),
            tmp_path / "ranks",
            method="gather",
            versions=(1, 2),
            device="cuda",
        )
        for r, res in results.items():
            assert res is not None and "error" not in res, (r, res)
        assert [p["failed"] for p in results[0]["pushes"]] == [[], []]
        assert engine.fingerprints().fingerprints == expected_fingerprints(ckpt, 2, engine)
    finally:
        engine.close()
