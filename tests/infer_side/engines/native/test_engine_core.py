"""EngineCore with the real model on tiny transformers checkpoints: every token is checked
against a plain full recompute (`forward_full`), every step against the slot invariants."""

from __future__ import annotations

import pytest
import torch

from infer_side.engines.native import engine_core
from infer_side.engines.native.engine_core import EngineCore, release_cuda_cache
from rlsync.config import EngineConfig
from rlsync.wire.codec import decode, encode
from rlsync.wire.protocol import (
    Abort,
    ContinueGeneration,
    EngineInfo,
    FlushCache,
    Generate,
    GenerateOutput,
    GetInfo,
    GetWeightsFingerprint,
    PauseGeneration,
    Result,
    SamplingParams,
    Shutdown,
    UpdateDone,
    UpdateWeightsFromDisk,
    token_versions,
)
from tests.checkpoints import make_hf_checkpoint

VOCAB = 96  # tests/checkpoints.TINY


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and intra-op threads crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("engine"), seed=3)


def make_core(ckpt, **cfg) -> EngineCore:
    return EngineCore.from_checkpoint(ckpt, EngineConfig(**{"kv_tokens": 512, **cfg}))


def gen(
    rid: str, prompt: list[int], max_new: int = 6, stream: bool = False, **sampling
) -> Generate:
    return Generate(
        request_id=rid,
        input_ids=prompt,
        stream=stream,
        sampling=SamplingParams(max_new_tokens=max_new, **sampling),
    )


def submit(core: EngineCore, *msgs: Generate) -> None:
    for msg in msgs:
        assert core.process(msg) == []


def drain(core: EngineCore, max_steps: int = 1000) -> dict[str, list[GenerateOutput]]:
    outs: dict[str, list[GenerateOutput]] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return outs
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
        core.scheduler.check_invariants()
    raise AssertionError("engine did not drain")


def greedy_ref(core: EngineCore, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, lps = list(prompt), []
    for _ in range(n):
        logp = torch.log_softmax(core.model.forward_full(torch.tensor(ids))[-1], -1)
        ids.append(int(logp.argmax()))
        lps.append(float(logp[ids[-1]]))
    return ids[len(prompt) :], lps


PROMPTS = [[5, 17, 33, 2, 71, 8, 8, 40, 1], [60, 3], [11, 12, 13, 14, 15, 16], [90], [7, 7, 7, 7]]


# ---------------------------------------------------------------- correctness of generation


def test_mixed_prompts_match_full_recompute(ckpt):
    core = make_core(ckpt)
    submit(core, *(gen(f"r{i}", p, max_new=4 + i) for i, p in enumerate(PROMPTS)))
    outs = drain(core)
    for i, p in enumerate(PROMPTS):
        (out,) = outs[f"r{i}"]
        ids, lps = greedy_ref(core, p, 4 + i)
        assert out.output_ids == ids
        assert out.logprobs == pytest.approx(lps, abs=1e-4)
        assert (out.finish_reason, out.prompt_tokens, out.cached_tokens) == ("length", len(p), 0)
        assert out.weight_version == out.min_weight_version == 0 and out.error == ""


def test_qwen2_tied_gqa_matches_full_recompute(tmp_path):
    path = make_hf_checkpoint(tmp_path, model_type="qwen2", tie=True, kv_heads=1, seed=5)
    core = EngineCore.from_checkpoint(path, EngineConfig(kv_tokens=128, max_running=3))
    submit(core, *(gen(f"r{i}", p, max_new=5) for i, p in enumerate(PROMPTS)))
    outs = drain(core)
    for i, p in enumerate(PROMPTS):
        assert outs[f"r{i}"][0].output_ids == greedy_ref(core, p, 5)[0]


def test_shared_prefix_served_from_cache_with_same_tokens(ckpt):
    core = make_core(ckpt)
    prompt = PROMPTS[0]
    submit(core, gen("a", prompt))
    first = drain(core)["a"][0]
    submit(core, gen("b", prompt), gen("c", prompt[:6] + [50, 51]))
    outs = drain(core)
    assert outs["b"][0].cached_tokens == len(prompt) - 1
    assert outs["b"][0].output_ids == first.output_ids == greedy_ref(core, prompt, 6)[0]
    assert outs["c"][0].cached_tokens == 6
    assert outs["c"][0].output_ids == greedy_ref(core, prompt[:6] + [50, 51], 6)[0]


def test_pool_running_full_finishes_every_request(ckpt):
    core = make_core(ckpt, kv_tokens=40, max_running=8)
    prompts = [[(13 * i + j) % VOCAB for j in range(4 + i % 4)] for i in range(10)]
    submit(core, *(gen(f"r{i}", p, max_new=10) for i, p in enumerate(prompts)))
    outs = drain(core)
    assert sorted(outs) == sorted(f"r{i}" for i in range(10))
    for i, p in enumerate(prompts):
        assert outs[f"r{i}"][0].output_ids == greedy_ref(core, p, 10)[0]
    assert core.info().retracted > 0


def test_seeded_sampling_same_across_batch_compositions(ckpt):
    prompt = PROMPTS[2]
    alone = make_core(ckpt)
    submit(alone, gen("x", prompt, max_new=12, temperature=1.0, seed=1234))
    expected = drain(alone)["x"][0]
    crowd = make_core(ckpt)
    submit(
        crowd,
        *(gen(f"o{i}", p, max_new=3 + i, temperature=0.7, seed=i) for i, p in enumerate(PROMPTS)),
    )
    crowd.step()
    submit(crowd, gen("x", prompt, max_new=12, temperature=1.0, seed=1234))
    got = drain(crowd)["x"][0]
    assert got.output_ids == expected.output_ids
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert got.output_ids != greedy_ref(alone, prompt, 12)[0]  # it really sampled


def test_top_k_one_equals_greedy(ckpt):
    core = make_core(ckpt)
    submit(
        core,
        gen("k", PROMPTS[0], max_new=8, temperature=1.3, top_k=1, seed=9),
        gen("g", PROMPTS[0], max_new=8),
    )
    outs = drain(core)
    assert outs["k"][0].output_ids == outs["g"][0].output_ids == greedy_ref(core, PROMPTS[0], 8)[0]


def test_stop_token_ends_generation(ckpt):
    core = make_core(ckpt)
    full, _ = greedy_ref(core, PROMPTS[1], 10)
    stop = full[3]
    submit(core, gen("s", PROMPTS[1], max_new=10, stop_token_ids=[stop, VOCAB - 1]))
    out = drain(core)["s"][0]
    assert out.finish_reason == "stop"
    assert out.output_ids == full[: full.index(stop) + 1]


def test_streaming_chunks_concatenate_to_final_output(ckpt):
    core = make_core(ckpt)
    submit(core, gen("s", PROMPTS[4], max_new=5, stream=True), gen("n", PROMPTS[4], max_new=5))
    outs = drain(core)
    chunks = outs["s"]
    assert [c.finished for c in chunks] == [False] * 4 + [True]
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert [t for c in chunks for t in c.output_ids] == outs["n"][0].output_ids
    assert [x for c in chunks for x in c.logprobs] == pytest.approx(outs["n"][0].logprobs)


# ---------------------------------------------------------------- validation and messages


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (gen("e", []), "input_ids: empty prompt"),
        (gen("e", [1, VOCAB, 2]), "input_ids[1]: token id 96 outside [0, 96)"),
        (gen("e", [1, -3]), "input_ids[1]"),
        (gen("e", [1] * 200, max_new=100), "max_position_embeddings (256)"),
        (gen("e", [1] * 50, max_new=30), "the KV pool (64 tokens)"),
        (gen("", [1, 2]), "request_id"),
        (gen("e", [1], temperature=-1.0), "sampling.temperature"),
        (gen("e", [1], top_p=1.5), "sampling.top_p"),
        (gen("e", [1], max_new=0), "sampling.max_new_tokens"),
    ],
)
def test_bad_generate_rejected_naming_field(ckpt, msg, field):
    core = make_core(ckpt, kv_tokens=64)
    (out,) = core.process(msg)
    assert isinstance(out, GenerateOutput) and out.finished and field in out.error
    assert out.request_id == msg.request_id and out.output_ids == []
    assert core.counts() == (0, 0) and not core.has_work()


def test_duplicate_request_id_rejected(ckpt):
    core = make_core(ckpt)
    submit(core, gen("d", [1, 2]))
    (out,) = core.process(gen("d", [3, 4]))
    assert "request_id" in out.error and "'d'" in out.error
    assert core.counts() == (1, 0)
    assert drain(core)["d"][0].output_ids == greedy_ref(core, [1, 2], 6)[0]


def test_info_round_trips_the_codec(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", [1, 2, 3]))
    core.step()
    (reply,) = core.process(GetInfo(request_id="i"))
    info = decode(encode(reply))
    assert isinstance(info, EngineInfo) and info == reply and info.request_id == "i"
    assert info.weight_version == 0 and info.model["vocab_size"] == VOCAB
    assert (info.kv_pool_size, info.kv_pool_used) == (512, 3)  # the new token has no KV yet
    assert (info.waiting, info.running, info.paused) == (0, 1, None)
    assert info.prefix_cache_tokens == 3


def test_shutdown_and_unknown_messages(ckpt):
    core = make_core(ckpt)
    (reply,) = core.process(Shutdown(request_id="z"))
    assert reply.success and core.shutdown_requested
    (reply,) = core.process(GenerateOutput(request_id="q"))
    assert isinstance(reply, Result) and not reply.success and "GenerateOutput" in reply.message


def test_weight_messages_go_to_the_update_machine(ckpt, monkeypatch):
    core = make_core(ckpt)
    seen = []
    monkeypatch.setattr(
        core.updates, "process", lambda msg: seen.append(msg) or [Result(request_id=msg.request_id)]
    )
    msg = GetWeightsFingerprint(request_id="f", names=[])
    assert core.process(msg) == [Result(request_id="f")] and seen == [msg]


def test_weights_incomplete_refuses_generate_and_stops_steps(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", [1, 2, 3], max_new=4))
    core.step()
    core.updates.weights_incomplete, core.updates.pending_version = True, 5
    (out,) = core.process(gen("b", [4]))
    assert out.error == "weights incomplete: update to version 5 in progress"
    assert not core.has_work() and core.step() == []
    assert len(core.scheduler.running[0].output_ids) == 1
    core.updates.weights_incomplete = False
    assert drain(core)["a"][0].output_ids == greedy_ref(core, [1, 2, 3], 4)[0]


def test_hold_admission_keeps_waiting_requests_waiting(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", [1, 2], max_new=3))
    core.step()
    core.updates.admission_held = True
    submit(core, gen("b", [3, 4], max_new=3))
    assert not core.is_idle()
    outs = drain(core)
    assert list(outs) == ["a"] and core.counts() == (1, 0) and not core.has_work()
    assert core.is_idle() and not core.flush_cache()[0]  # idle for weight sync, not for flush
    core.updates.admission_held = False
    assert not core.is_idle()
    assert drain(core)["b"][0].output_ids == greedy_ref(core, [3, 4], 3)[0]


# ---------------------------------------------------------------- flush and the empty_cache rule


def test_flush_refused_while_busy_changes_nothing(ckpt):
    core = make_core(ckpt, max_running=1)
    submit(core, gen("a", PROMPTS[0]), gen("b", PROMPTS[1]))
    core.step()
    before = core.info()
    (reply,) = core.process(FlushCache(request_id="f"))
    assert not reply.success
    assert "1 waiting" in reply.message and "1 running" in reply.message
    assert core.info() == before
    assert drain(core)["a"][0].output_ids == greedy_ref(core, PROMPTS[0], 6)[0]


def test_flush_when_idle_empties_prefix_cache(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", PROMPTS[0]))
    drain(core)
    assert core.info().prefix_cache_tokens > 0
    assert core.flush_cache(empty_cache=False) == (True, "cache flushed")
    info = core.info()
    assert info.prefix_cache_tokens == 0 and info.kv_pool_used == 0
    submit(core, gen("b", PROMPTS[0]))
    out = drain(core)["b"][0]
    assert out.cached_tokens == 0 and out.output_ids == greedy_ref(core, PROMPTS[0], 6)[0]


@pytest.fixture
def empty_cache_spy(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    return calls


def test_release_cuda_cache_only_when_asked_and_on_cuda(empty_cache_spy):
    assert release_cuda_cache(torch.device("cuda"), True) is True
    assert release_cuda_cache(torch.device("cuda", 0), False) is False
    assert release_cuda_cache(torch.device("cpu"), True) is False
    assert empty_cache_spy == [1]


def test_flush_calls_empty_cache_exactly_when_asked(ckpt, monkeypatch, empty_cache_spy):
    core = make_core(ckpt)
    monkeypatch.setattr(core, "device", torch.device("cuda"))  # the device check, not the pool
    assert core.flush_cache(empty_cache=False)[0] and empty_cache_spy == []
    core.reset_kv(empty_cache=False)
    assert empty_cache_spy == []
    assert core.process(FlushCache(request_id="f"))[0].success and empty_cache_spy == [1]
    assert core.flush_cache()[0] and empty_cache_spy == [1, 1]
    submit(core, gen("a", [1, 2]))
    assert not core.flush_cache()[0] and empty_cache_spy == [1, 1]  # refused: not called


def test_engine_on_cpu_never_calls_empty_cache(ckpt, empty_cache_spy):
    core = make_core(ckpt)
    assert engine_core.release_cuda_cache(core.device, True) is False
    assert core.flush_cache(empty_cache=True)[0] and empty_cache_spy == []


# ---------------------------------------------------------------- pause modes and abort


def test_pause_abort_finishes_everything_in_flight(ckpt):
    core = make_core(ckpt, max_running=2)
    submit(core, *(gen(f"r{i}", p, max_new=8) for i, p in enumerate(PROMPTS[:3])))
    core.step()
    core.step()
    replies = core.process(PauseGeneration(request_id="p", mode="abort"))
    outs = {o.request_id: o for o in replies if isinstance(o, GenerateOutput)}
    assert [r for r in replies if isinstance(r, Result)][0].success
    assert sorted(outs) == ["r0", "r1", "r2"]
    assert all(o.finish_reason == "abort" and o.finished for o in outs.values())
    assert outs["r0"].output_ids == greedy_ref(core, PROMPTS[0], 2)[0]
    assert outs["r2"].output_ids == []  # r2 was still waiting
    submit(core, gen("late", [1, 2], max_new=2))
    assert not core.has_work() and core.step() == [] and core.counts() == (1, 0)
    core.process(ContinueGeneration(request_id="c"))
    assert drain(core)["late"][0].output_ids == greedy_ref(core, [1, 2], 2)[0]


def test_pause_retract_restarts_with_same_greedy_tokens(ckpt):
    core = make_core(ckpt)
    submit(core, *(gen(f"r{i}", p, max_new=7) for i, p in enumerate(PROMPTS)))
    for _ in range(3):
        core.step()
    assert core.process(PauseGeneration(request_id="p", mode="retract"))[0].success
    assert core.counts() == (len(PROMPTS), 0) and core.step() == [] and not core.has_work()
    assert core.kv_pool.used == core.prefix_cache.num_tokens  # no request holds KV
    core.scheduler.check_invariants()
    core.reset_kv(empty_cache=False)  # what a weight update does here
    core.continue_generation()
    outs = drain(core)
    for i, p in enumerate(PROMPTS):
        assert outs[f"r{i}"][0].output_ids == greedy_ref(core, p, 7)[0]


def test_pause_in_place_makes_no_progress_then_continues(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", PROMPTS[0], max_new=6), gen("b", PROMPTS[2], max_new=6))
    core.step()
    core.step()
    core.pause("in_place")
    used, lens = core.kv_pool.used, [len(r.output_ids) for r in core.scheduler.running]
    for _ in range(3):
        assert core.step() == []
    assert core.paused_mode() == "in_place" and not core.has_work()
    assert core.kv_pool.used == used and [len(r.output_ids) for r in core.scheduler.running] == lens
    core.continue_generation()
    outs = drain(core)
    assert outs["a"][0].output_ids == greedy_ref(core, PROMPTS[0], 6)[0]
    assert outs["b"][0].output_ids == greedy_ref(core, PROMPTS[2], 6)[0]


def test_in_place_weight_change_invalidates_prefix_and_tracks_versions(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", PROMPTS[0], max_new=6))
    drain(core)
    submit(core, gen("b", PROMPTS[0], max_new=6))
    core.step()
    core.pause("in_place")
    core.flush_kv(empty_cache=False)  # what an update does when requests still hold KV
    core.weight_version = 1
    core.continue_generation()
    submit(core, gen("c", PROMPTS[0], max_new=6))
    outs = drain(core)
    assert outs["c"][0].cached_tokens == 0  # nothing computed under version 0 is reused
    assert (outs["b"][0].min_weight_version, outs["b"][0].weight_version) == (0, 1)
    assert (outs["c"][0].min_weight_version, outs["c"][0].weight_version) == (1, 1)
    assert core.kv_pool.used == core.prefix_cache.num_tokens  # dead nodes freed


def fresh_greedy(ckpt, prompt: list[int], n: int) -> list[int]:
    """What a fresh engine on `ckpt` generates greedily for `prompt`."""
    core = make_core(ckpt)
    submit(core, gen("ref", prompt, max_new=n))
    return drain(core)["ref"][0].output_ids


@pytest.mark.parametrize("load_mode", ["shadow", "in_place"])
def test_update_mid_request_spans_match_a_fresh_engine_of_each_version(ckpt, tmp_path, load_mode):
    """A real update (disk transport) lands under an in_place pause while a greedy request
    runs: its tokens before the swap are version 0's, after it version 1's, each exactly what
    a fresh engine of that version generates from the same prefix (its KV is recomputed)."""
    new = make_hf_checkpoint(tmp_path, seed=11)
    core = make_core(ckpt)
    prompt = PROMPTS[0]
    submit(core, gen("a", prompt, max_new=12), gen("b", PROMPTS[1], max_new=3))
    replies = [r for _ in range(4) for r in core.step()]
    update = UpdateWeightsFromDisk(
        request_id="u", weight_version=1, path=str(new), load_mode=load_mode, pause_mode="in_place"
    )
    replies += core.process(update)
    outs: dict[str, list] = {}
    for _ in range(200):
        core.wait_for_update(5.0)
        replies += core.step()
        if any(isinstance(r, UpdateDone) for r in replies):
            break
    done = [r for r in replies if isinstance(r, UpdateDone)]
    assert len(done) == 1 and done[0].success, done
    for r in replies + [o for v in drain(core).values() for o in v]:
        if isinstance(r, GenerateOutput):
            outs.setdefault(r.request_id, []).append(r)
    (a,) = outs["a"]
    spans = [(s.version, s.tokens) for s in a.version_spans]
    assert [v for v, _ in spans] == [0, 1] and sum(n for _, n in spans) == 12, spans
    assert token_versions(a.version_spans) == [0] * spans[0][1] + [1] * spans[1][1]
    assert (a.min_weight_version, a.weight_version) == (0, 1)
    before = a.output_ids[: spans[0][1]]
    assert before == fresh_greedy(ckpt, prompt, len(before))
    assert a.output_ids[len(before) :] == fresh_greedy(new, prompt + before, spans[1][1])
    assert a.output_ids != fresh_greedy(ckpt, prompt, 12)  # the versions do differ here
    (b,) = outs["b"]  # finished before the swap: one span
    assert [(s.version, s.tokens) for s in b.version_spans] == [(0, 3)]
    assert core.kv_pool.used == core.prefix_cache.num_tokens


def test_abort_one_request_by_id(ckpt):
    core = make_core(ckpt)
    submit(core, gen("a", PROMPTS[0], max_new=6), gen("b", PROMPTS[1], max_new=6))
    core.step()
    replies = core.process(Abort(request_id="x", target_id="b"))
    result = next(r for r in replies if isinstance(r, Result))
    aborted = next(r for r in replies if isinstance(r, GenerateOutput))
    assert result.success and aborted.request_id == "b" and aborted.finish_reason == "abort"
    assert aborted.output_ids == greedy_ref(core, PROMPTS[1], 1)[0]
    (missing,) = core.process(Abort(request_id="y", target_id="nope"))
    assert not missing.success and "nope" in missing.message
    outs = drain(core)
    assert list(outs) == ["a"] and outs["a"][0].output_ids == greedy_ref(core, PROMPTS[0], 6)[0]
