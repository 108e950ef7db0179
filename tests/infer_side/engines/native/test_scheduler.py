"""Scheduler against a fake model that proves the KV bookkeeping.

`TraceModel` writes each new token's (id, position) into its K slot, then reads every
sequence back through `seq_slots` and predicts from what it read. A wrong slot anywhere (a
bad prefix match, a reused or leaked slot, a stale retraction) changes the prediction, so
comparing outputs with `reference()` (pure Python over the prompt) checks slot ownership
end to end; `check_invariants()` after every step checks it directly.
"""

from __future__ import annotations

import torch

from infer_side.engines.native.forward_batch import ForwardBatch
from infer_side.engines.native.kv_pool import KVPool
from infer_side.engines.native.radix_cache import RadixCache
from infer_side.engines.native.scheduler import Scheduler
from infer_side.engines.request import Request
from rlsync.wire.protocol import SamplingParams

VOCAB = 50


def seq_logits(ids: list[int]) -> torch.Tensor:
    """Deterministic, well-spread logits for a whole sequence."""
    seed = sum((i + 1) * t for i, t in enumerate(ids)) * 1_000_003 + len(ids)
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed % (1 << 62))) * 3


def reference(prompt: list[int], max_new: int, stop: tuple[int, ...] = ()) -> list[int]:
    ids = list(prompt)
    while len(ids) - len(prompt) < max_new:
        ids.append(int(seq_logits(ids).argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt) :]


class TraceModel:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self.batches: list[ForwardBatch] = []

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        k = self.pool.k
        k[0, batch.out_slots, 0, 0] = batch.input_ids.float()
        k[0, batch.out_slots, 0, 1] = batch.positions.float()
        rows = []
        for slots in batch.seq_slots:
            assert k[0, slots, 0, 1].long().tolist() == list(range(len(slots)))
            rows.append(seq_logits(k[0, slots, 0, 0].long().tolist()))
        self.batches.append(batch)
        return torch.stack(rows)


def make(
    kv: int = 256, max_running: int = 8, max_prefill: int = 512
) -> tuple[Scheduler, TraceModel]:
    k = torch.zeros(1, kv, 1, 2)
    pool = KVPool(k, torch.zeros_like(k), max_running, max_len=128)
    model = TraceModel(pool)
    return Scheduler(pool, RadixCache(pool.allocator), model, max_running, max_prefill), model


def req(rid: str, prompt: list[int], max_new: int = 6, stream: bool = False, **kw) -> Request:
    return Request(
        rid=rid,
        prompt=prompt,
        params=SamplingParams(max_new_tokens=max_new, **kw),
        stream=stream,
        seed=kw.get("seed") or 0,
    )


def run(sched: Scheduler, max_steps: int = 500) -> dict[str, list]:
    """Step until idle; every output per request id, in order."""
    outs: dict[str, list] = {}
    for _ in range(max_steps):
        if not (sched.waiting or sched.running):
            return outs
        for out in sched.step(version=3):
            outs.setdefault(out.request_id, []).append(out)
        sched.check_invariants()
    raise AssertionError("scheduler did not drain")


def prompts(n: int, base: int = 0) -> list[list[int]]:
    return [[(base + 7 * i + j) % VOCAB for j in range(3 + i % 5)] for i in range(n)]


def test_mixed_lengths_match_reference():
    sched, model = make()
    ps = prompts(6)
    for i, p in enumerate(ps):
        sched.add(req(f"r{i}", p, max_new=5 + i))
    outs = run(sched)
    for i, p in enumerate(ps):
        (final,) = outs[f"r{i}"]
        assert final.output_ids == reference(p, 5 + i)
        assert final.finish_reason == "length" and final.finished
        assert len(final.logprobs) == len(final.output_ids)
        assert final.prompt_tokens == len(p) and final.weight_version == 3
    assert model.batches[0].new_lens == [len(p) for p in ps]  # one batch, all prefills
    assert sched.pool.used == sched.cache.num_tokens  # nothing private left


def test_new_requests_join_running_batch():
    sched, model = make()
    sched.add(req("a", [1, 2, 3], max_new=8))
    sched.step(0)
    sched.step(0)
    sched.add(req("b", [4, 5, 6, 7], max_new=3))
    sched.step(0)
    assert model.batches[-1].new_lens == [1, 4]  # a decodes while b prefills
    outs = run(sched)
    assert outs["a"][0].output_ids == reference([1, 2, 3], 8)
    assert outs["b"][0].output_ids == reference([4, 5, 6, 7], 3)


def test_max_running_and_prefill_budget_bound_each_step():
    sched, model = make(max_running=3, max_prefill=10)
    ps = prompts(8)
    for i, p in enumerate(ps):
        sched.add(req(f"r{i}", p))
    outs = run(sched)
    assert len(outs) == 8
    for batch in model.batches:
        assert batch.batch_size <= 3
        prefill = [n for n in batch.new_lens if n > 1]
        assert sum(prefill) <= 10 or len(prefill) == 1


def test_prefix_cache_serves_second_request():
    sched, model = make()
    prompt = [9, 8, 7, 6, 5]
    sched.add(req("a", prompt))
    first = run(sched)["a"][0]
    assert first.cached_tokens == 0
    sched.add(req("b", prompt))
    sched.add(req("c", prompt + [1, 2]))
    outs = run(sched)
    assert outs["b"][0].cached_tokens == 4  # the last prompt token is always recomputed
    assert outs["c"][0].cached_tokens == 5
    assert outs["b"][0].output_ids == first.output_ids == reference(prompt, 6)
    assert outs["c"][0].output_ids == reference(prompt + [1, 2], 6)
    assert model.batches[-len(first.output_ids)].new_lens[0] == 1


def test_identical_prompts_in_one_step_share_kv_after_prefill():
    sched, _ = make()
    prompt = [3, 1, 4, 1, 5, 9]
    for i in range(4):
        sched.add(req(f"r{i}", prompt, max_new=3))
    sched.step(0)
    assert sched.pool.used == len(prompt)  # three duplicate prompt KVs went back to the pool
    sched.check_invariants()
    outs = run(sched)
    assert all(o[0].output_ids == reference(prompt, 3) for o in outs.values())


def test_pool_pressure_retracts_and_finishes_everything():
    sched, _ = make(kv=40, max_running=8)
    ps = prompts(12, base=3)
    for i, p in enumerate(ps):
        sched.add(req(f"r{i}", p, max_new=12))
    outs = run(sched)
    assert sorted(outs) == sorted(f"r{i}" for i in range(12))
    for i, p in enumerate(ps):
        assert outs[f"r{i}"][0].output_ids == reference(p, 12)
    assert sched.num_retracted > 0


def test_lru_eviction_makes_room_for_new_prompts():
    sched, _ = make(kv=30, max_running=2)
    for i, p in enumerate(prompts(10, base=11)):
        sched.add(req(f"r{i}", p, max_new=4))
        assert run(sched)[f"r{i}"][0].output_ids == reference(p, 4)
    assert sched.cache.num_tokens <= 30 and sched.num_retracted == 0


def test_retract_all_then_resume_gives_same_tokens():
    sched, _ = make(max_running=3)
    ps = prompts(3, base=5)
    for i, p in enumerate(ps):
        sched.add(req(f"r{i}", p, max_new=8))
    sched.add(req("waiting", [1, 2], max_new=2))
    for _ in range(3):
        sched.step(0)
    sched.retract_all()
    sched.check_invariants()
    assert not sched.running
    assert [r.rid for r in sched.waiting] == ["r0", "r1", "r2", "waiting"]
    assert all(not r.output_ids for r in sched.waiting)
    outs = run(sched)
    for i, p in enumerate(ps):
        assert outs[f"r{i}"][0].output_ids == reference(p, 8)


def test_retracted_stream_keeps_what_it_sent():
    sched, _ = make()
    prompt = [2, 7, 1, 8]
    sched.add(req("s", prompt, max_new=7, stream=True))
    chunks = [o for _ in range(3) for o in sched.step(0)]
    sched.retract_all()
    chunks += run(sched)["s"]
    ids = [t for c in chunks for t in c.output_ids]
    assert ids == reference(prompt, 7)
    assert [c.finished for c in chunks] == [False] * 6 + [True]
    assert sum(len(c.logprobs) for c in chunks) == 7


def test_abort_running_and_waiting_frees_kv():
    sched, _ = make(max_running=1)
    sched.add(req("a", [1, 2, 3], max_new=10))
    sched.add(req("b", [4, 5], max_new=10))
    sched.step(0)
    sched.step(0)
    out = sched.abort("a", version=2)
    assert out.finish_reason == "abort" and out.output_ids == reference([1, 2, 3], 2)
    assert sched.abort("b", version=2).output_ids == []
    assert sched.abort("b", version=2) is None
    sched.check_invariants()
    assert sched.pool.used == sched.cache.num_tokens and not sched.running


def test_stop_token_finishes_and_is_kept():
    sched, _ = make()
    prompt = [5, 10, 15]
    full = reference(prompt, 8)
    sched.add(req("a", prompt, max_new=8, stop_token_ids=[full[2]]))
    (out,) = run(sched)["a"]
    assert out.finish_reason == "stop"
    assert out.output_ids == full[: full.index(full[2]) + 1]


def test_stream_chunks_concatenate_to_output():
    sched, _ = make()
    sched.add(req("s", [1, 1, 2, 3], max_new=5, stream=True))
    sched.add(req("n", [1, 1, 2, 3], max_new=5))
    outs = run(sched)
    assert [c.finished for c in outs["s"]] == [False] * 4 + [True]
    assert all(len(c.output_ids) == 1 for c in outs["s"])
    assert [t for c in outs["s"] for t in c.output_ids] == outs["n"][0].output_ids
    assert [x for c in outs["s"] for x in c.logprobs] == outs["n"][0].logprobs
    assert outs["s"][-1].finish_reason == "length"


def test_seeded_sampling_independent_of_batch():
    prompt = [4, 4, 2]
    alone, _ = make()
    alone.add(req("x", prompt, max_new=10, temperature=1.0, seed=42))
    expected = run(alone)["x"][0]
    crowd, _ = make()
    for i, p in enumerate(prompts(5)):
        crowd.add(req(f"o{i}", p, max_new=3 + i, temperature=0.8, seed=i + 1))
    crowd.step(0)
    crowd.add(req("x", prompt, max_new=10, temperature=1.0, seed=42))
    got = run(crowd)["x"][0]
    assert got.output_ids == expected.output_ids and got.logprobs == expected.logprobs
    assert got.output_ids != reference(prompt, 10)  # it really sampled


def test_invalidate_mid_flight_never_reuses_old_kv():
    sched, _ = make()
    prompt = [6, 6, 1, 2, 3]
    sched.add(req("a", prompt, max_new=6))
    sched.step(0)
    sched.step(0)
    sched.cache.invalidate()
    sched.check_invariants()
    sched.add(req("b", prompt, max_new=6))
    outs = run(sched)
    assert outs["b"][0].cached_tokens == 0
    assert outs["a"][0].output_ids == outs["b"][0].output_ids == reference(prompt, 6)
    # a's tokens were not cached after the invalidate; only b's are, and nothing leaked.
    assert sched.cache.num_tokens == len(prompt) + 5
    assert sched.pool.used == sched.cache.num_tokens


def test_reset_kv_only_without_running_requests():
    sched, _ = make()
    sched.add(req("a", [1, 2, 3]))
    sched.step(0)
    try:
        sched.reset_kv()
        raise AssertionError("reset_kv with a running request")
    except RuntimeError as e:
        assert "1 running" in str(e)
    sched.retract_all()
    sched.reset_kv()
    assert sched.pool.used == 0 and sched.cache.num_nodes == 0
    assert run(sched)["a"][0].output_ids == reference([1, 2, 3], 6)


def test_held_admission_runs_only_running_requests():
    sched, model = make()
    sched.add(req("a", [1, 2], max_new=4))
    sched.step(0)
    sched.add(req("b", [3, 4], max_new=4))
    sched.step(0, admit=False)
    assert [r.rid for r in sched.running] == ["a"] and len(sched.waiting) == 1
    while sched.running:
        sched.step(0, admit=False)
    assert sched.step(0, admit=False) == [] and len(sched.waiting) == 1
    assert model.batches[-1].batch_size == 1
