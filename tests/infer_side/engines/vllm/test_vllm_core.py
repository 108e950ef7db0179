"""VllmCore against a fake of vLLM's LLMEngine (the other side): how our requests, pauses,
cache flushes and weight loads map onto vLLM's calls. The real vLLM engine behind the same
core is tested in tests/e2e/test_vllm_backend.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from infer_side.engines.checkpoint import load_model
from infer_side.engines.vllm.vllm_core import VllmCore
from rlsync.config import EngineConfig
from rlsync.wire.protocol import Generate, GenerateOutput, SamplingParams
from tests.checkpoints import make_hf_checkpoint


class FakeParams(SimpleNamespace):
    """Stands in for vllm.SamplingParams: keeps the keyword arguments."""


class FakeLLM:
    """Each step gives every request its next token: (last token + 1) % 50, logprob -0.5."""

    def __init__(self):
        self.active: dict[str, tuple[list[int], FakeParams, list[int]]] = {}
        self.calls: list[str] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.loads: list[list[str]] = []

    def add_request(self, rid, prompt, params):
        self.calls.append(f"add:{rid}")
        self.active[rid] = (list(prompt["prompt_token_ids"]), params, [])

    def step(self):
        out = []
        for rid, (prompt, params, tokens) in list(self.active.items()):
            tokens.append(((tokens or prompt)[-1] + 1) % 50)
            reason = "stop" if tokens[-1] in params.stop_token_ids else None
            if reason is None and len(tokens) >= params.max_tokens:
                reason = "length"
            logprobs = [{t: SimpleNamespace(logprob=-0.5)} for t in tokens]
            completion = SimpleNamespace(
                token_ids=list(tokens), logprobs=logprobs, finish_reason=reason
            )
            out.append(
                SimpleNamespace(
                    request_id=rid,
                    outputs=[completion],
                    finished=reason is not None,
                    num_cached_tokens=0,
                )
            )
            if reason is not None:
                del self.active[rid]
        return out

    def abort_request(self, rids):
        self.calls.append(f"abort:{','.join(rids)}")
        for rid in rids:
            self.active.pop(rid, None)

    def reset_prefix_cache(self):
        self.calls.append("reset")
        return not self.active

    def collective_rpc(self, method, kwargs):
        self.calls.append(method)
        self.loaded = {n: t.clone() for n, t in kwargs["weights_iterator"]}
        self.loads.append(list(self.loaded))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def core(ckpt):
    model_cfg, weights = load_model(ckpt)
    return VllmCore(
        model_cfg, weights, FakeLLM(), EngineConfig(backend="vllm"), 128, sampling_params=FakeParams
    )


def gen(rid, prompt, n=4, stream=False, stop=()):
    return Generate(
        request_id=rid,
        input_ids=prompt,
        stream=stream,
        sampling=SamplingParams(max_new_tokens=n, stop_token_ids=list(stop)),
    )


def run(core, limit=100):
    outs: dict[str, list[GenerateOutput]] = {}
    for _ in range(limit):
        if not core.has_work():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def test_tokens_logprobs_and_versions_come_from_vllm(core):
    core.weight_version = 3
    assert core.process(gen("a", [1, 2, 3])) == []
    (out,) = run(core)["a"]
    assert out.output_ids == [4, 5, 6, 7] and out.logprobs == [-0.5] * 4
    assert out.finish_reason == "length" and out.weight_version == out.min_weight_version == 3
    assert core.llm.active == {} and core.counts() == (0, 0)


def test_stop_tokens_and_streaming_chunks(core):
    core.process(gen("s", [10], n=8, stream=True, stop=[13]))
    chunks = run(core)["s"]
    assert [c.output_ids for c in chunks] == [[11], [12], [13]]
    assert chunks[-1].finished and chunks[-1].finish_reason == "stop"


def test_request_ids_and_prompts_are_checked_before_vllm_sees_them(core):
    core.process(gen("a", [1]))
    (dup,) = core.process(gen("a", [1]))
    (long,) = core.process(gen("b", [1] * 120, n=20))
    assert "already in flight" in dup.error and "exceeds" in long.error
    assert core.llm.calls == []  # admitted only on the next step


def test_pause_abort_finishes_everything(core):
    core.process(gen("a", [1], n=10))
    core.step()
    core.pause("abort")
    (out,) = core.step()  # paused: no generation, the abort outputs go out
    assert out.finish_reason == "abort" and out.output_ids == [2]
    assert "abort:a" in core.llm.calls and core.counts() == (0, 0)


def test_pause_retract_readds_and_gives_the_same_tokens(core):
    core.process(gen("a", [1], n=5))
    core.step()
    core.step()
    core.pause("retract")
    assert core.counts() == (1, 0) and core.step() == [] and "abort:a" in core.llm.calls
    core.continue_generation()
    (out,) = run(core)["a"]
    assert out.output_ids == [2, 3, 4, 5, 6] and core.info().retracted == 1
    assert core.llm.calls.count("add:a") == 2


def test_held_admission_keeps_requests_out_of_vllm(core):
    core.updates.admission_held = True
    core.process(gen("a", [1]))
    assert core.step() == [] and core.llm.calls == [] and core.is_idle()
    core.updates.admission_held = False
    assert run(core)["a"][0].output_ids == [2, 3, 4, 5]


def test_flush_after_an_update_readds_running_requests_with_their_tokens_then_resets(core):
    core.process(gen("a", [1], n=6))
    core.step()
    core.flush_kv(empty_cache=False)
    assert core.llm.calls[-2:] == ["abort:a", "reset"] and core.counts() == (1, 0)
    core.weight_version = 1  # what the update sets right after the flush
    (out,) = run(core)["a"]
    assert out.output_ids == [2, 3, 4, 5, 6, 7]  # its token kept, the rest on the new weights
    assert [(s.version, s.tokens) for s in out.version_spans] == [(0, 1), (1, 5)]
    assert core.llm.calls.count("add:a") == 2 and core.info().retracted == 0


def test_flush_cache_only_when_idle(core):
    core.process(gen("a", [1]))
    ok, why = core.flush_cache()
    assert not ok and "1 waiting" in why and "reset" not in core.llm.calls
    run(core)
    assert core.flush_cache() == (True, "cache flushed") and core.llm.calls[-1] == "reset"


def test_empty_cache_only_when_asked_on_both_paths(core, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    core.device = torch.device("cuda")  # the device check, not real CUDA
    core.flush_kv(empty_cache=False)
    core.flush_cache(empty_cache=False)
    assert calls == []
    core.flush_kv(empty_cache=True)
    core.flush_cache(empty_cache=True)
    assert calls == [1, 1]


def test_apply_weights_loads_every_hf_tensor_through_the_reload_path(core):
    shadow = core.new_shadow()
    for i, view in enumerate(shadow.hf_views().values()):
        view.fill_(float(i))
    core.apply_weights(shadow)
    assert core.llm.calls == ["reload_weights"] and core.live_weights() is shadow
    expected = shadow.hf_views()
    assert list(core.llm.loaded) == list(expected)  # q, k, v (and gate, up) together
    assert all(torch.equal(core.llm.loaded[n], t) for n, t in expected.items())


def test_in_place_loads_whole_fused_groups_as_buckets_land(core):
    """q/k/v (and gate/up) reach vLLM in one reload call, never in parts; what was streamed
    is not loaded again at the commit."""
    core.engine_cfg.load_chunk_mb = 0  # load at every bucket
    live = core.live_weights()
    sink = core.stream_sink(live)
    p = "model.layers.0.self_attn."
    sink.written(p + "q_proj.weight")
    sink.written(p + "k_proj.weight")
    sink.bucket_done()
    assert core.llm.loads == []  # v is still missing: the group waits
    sink.written(p + "v_proj.weight")
    sink.written("model.norm.weight")
    sink.bucket_done()
    assert core.llm.loads == [
        [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight", "model.norm.weight"]
    ]
    core.apply_weights(live)
    rest = [n for n in live.hf_views() if n not in core.llm.loads[0]]
    assert core.llm.loads[1] == rest and len(core.llm.loads) == 2


def test_small_loads_wait_for_the_commit(core):
    """Below engine.load_chunk_mb nothing is loaded per bucket: one reload at the commit."""
    live = core.live_weights()
    sink = core.stream_sink(live)
    for name in live.hf_views():
        sink.written(name)
        sink.bucket_done()
    assert core.llm.loads == []
    core.apply_weights(live)
    assert core.llm.loads == [list(live.hf_views())]


def test_tied_embedding_is_loaded_as_the_head_too(tmp_path):
    """vLLM re-packs its CPU copy of a tied head only when the head is loaded by name: the
    embedding goes to it under both names, in the same call, on both load paths."""
    model_cfg, weights = load_model(make_hf_checkpoint(tmp_path, tie=True))
    core = VllmCore(
        model_cfg, weights, FakeLLM(), EngineConfig(backend="vllm"), 128, sampling_params=FakeParams
    )
    core.engine_cfg.load_chunk_mb = 0
    live = core.live_weights()
    sink = core.stream_sink(live)
    sink.written("model.embed_tokens.weight")
    sink.bucket_done()
    assert core.llm.loads == [["model.embed_tokens.weight", "lm_head.weight"]]
    embed = live.hf_views()["model.embed_tokens.weight"]
    assert torch.equal(core.llm.loaded["lm_head.weight"], embed)
    shadow = core.new_shadow()
    shadow.copy_from(live)
    core.apply_weights(shadow)
    assert core.llm.loads[-1] == [*shadow.hf_views(), "lm_head.weight"]
