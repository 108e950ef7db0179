"""The delta encoding (`rlsync.plan.delta`, `rlsync.plan.delta_encode`): lossless over long chains of random sparse updates,
dense buckets sent whole, and every corruption or base mismatch refused before a write."""

from __future__ import annotations

import threading

import pytest
import torch

from rlsync.plan import delta
from rlsync.plan.buckets import plan_buckets
from rlsync.plan.delta import RAW, SPARSE, DeltaError
from rlsync.plan.delta_encode import DeltaEncoder, changes
from rlsync.transports.base import WeightWriter

SHAPES = {"a": (64, 33), "b": (7,), "c": (300, 20), "d": (1,), "e": (0,)}


def make_plan(dtypes: dict[str, torch.dtype], bucket_bytes: int = 16 << 10):
    specs = [(n, str(dtypes[n]).removeprefix("torch."), s) for n, s in SHAPES.items()]
    return plan_buckets(specs, bucket_bytes)


def random_weights(dtypes, gen) -> dict[str, torch.Tensor]:
    return {n: torch.randn(s, generator=gen).to(dtypes[n]) for n, s in SHAPES.items()}


def perturb(weights, frac: float, gen) -> dict[str, torch.Tensor]:
    """A new version where about `frac` of the elements changed (by a tiny step)."""
    out = {}
    for name, t in weights.items():
        flat = t.clone().reshape(-1)
        hit = torch.rand(flat.shape, generator=gen) < frac
        flat[hit] = (flat[hit].float() + 1e-2 * torch.randn(int(hit.sum()), generator=gen)).to(
            t.dtype
        )
        out[name] = flat.reshape(t.shape)
    return out


def apply_all(encoder: DeltaEncoder, plan, new, writer, full=False) -> list[int]:
    kinds = []
    for g, bucket in enumerate(plan.buckets):
        payload = encoder.encode(g, new, full=full)
        buf = torch.zeros(payload.nbytes + 16, dtype=torch.uint8)
        payload.write_into(buf)
        delta.apply_region(g, bucket, buf, writer)
        kinds.append(payload.kind)
    return kinds


def writer_for(store, base=None) -> WeightWriter:
    return WeightWriter(store, threading.Event(), base=base)


def assert_equal_bytes(store, weights):
    for name, t in weights.items():
        assert torch.equal(store[name].view(torch.uint8), t.view(torch.uint8)), name


MIXED = {"a": torch.float32, "b": torch.bfloat16, "c": torch.bfloat16, "d": torch.float32}


@pytest.mark.parametrize(
    "dtypes",
    [
        {n: torch.float32 for n in SHAPES},
        {n: torch.bfloat16 for n in SHAPES},
        {**MIXED, "e": torch.float32},
    ],
    ids=["fp32", "bf16", "mixed"],
)
def test_a_long_chain_of_sparse_deltas_is_bit_exact(dtypes):
    gen = torch.Generator().manual_seed(0)
    plan = make_plan(dtypes)
    weights = random_weights(dtypes, gen)
    store = {n: torch.zeros_like(t) for n, t in weights.items()}
    encoder = DeltaEncoder(plan, max_changed=0.5)
    encoder.begin()
    assert set(apply_all(encoder, plan, weights, writer_for(store))) == {RAW}  # no base yet
    encoder.version = 1
    for step in range(40):
        weights = perturb(weights, [0.001, 0.01, 0.1][step % 3], gen)
        encoder.begin()
        kinds = apply_all(encoder, plan, weights, writer_for(store))
        assert_equal_bytes(store, weights)
        assert SPARSE in kinds
        assert encoder.stats.wire_bytes < encoder.stats.raw_bytes
    for g, bucket in enumerate(plan.buckets):  # the base is the last version, byte for byte
        packed = torch.zeros(bucket.nbytes, dtype=torch.uint8)
        from rlsync.plan.buckets import pack_bucket

        pack_bucket(bucket, weights, packed)
        assert torch.equal(packed, encoder.base[g])


def test_a_dense_change_is_sent_whole_and_unchanged_weights_cost_headers_only():
    dtypes = {n: torch.float32 for n in SHAPES}
    gen = torch.Generator().manual_seed(1)
    plan = make_plan(dtypes)
    weights = random_weights(dtypes, gen)
    store = {n: torch.zeros_like(t) for n, t in weights.items()}
    encoder = DeltaEncoder(plan, max_changed=0.5)
    apply_all(encoder, plan, weights, writer_for(store))
    encoder.version = 1
    encoder.begin()
    assert apply_all(encoder, plan, weights, writer_for(store)) == [SPARSE] * len(plan.buckets)
    assert encoder.stats.changed_units == 0
    assert encoder.stats.wire_bytes == len(plan.buckets) * (delta.HEADER_BYTES + 0)
    dense = {n: t + 1 for n, t in weights.items()}
    encoder.begin()
    assert apply_all(encoder, plan, dense, writer_for(store)) == [RAW] * len(plan.buckets)
    assert_equal_bytes(store, dense)


def test_a_shadow_store_is_brought_to_the_base_before_it_is_patched():
    dtypes = {n: torch.bfloat16 for n in SHAPES}
    gen = torch.Generator().manual_seed(2)
    plan = make_plan(dtypes)
    v1 = random_weights(dtypes, gen)
    live = {n: t.clone() for n, t in v1.items()}
    shadow = {n: torch.full_like(t, 7.0) for n, t in v1.items()}  # an older version
    encoder = DeltaEncoder(plan, max_changed=0.5)
    encoder.begin()
    apply_all(encoder, plan, v1, writer_for({n: t.clone() for n, t in v1.items()}))
    encoder.version = 1
    v2 = perturb(v1, 0.01, gen)
    encoder.begin()
    apply_all(encoder, plan, v2, writer_for(shadow, base=live))
    assert_equal_bytes(shadow, v2)
    assert_equal_bytes(live, v1)  # the live store was only read


def _sparse_case(seed: int = 3):
    dtypes = {n: torch.float32 for n in SHAPES}
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(dtypes, bucket_bytes=1 << 20)  # one bucket
    v1 = random_weights(dtypes, gen)
    encoder = DeltaEncoder(plan, max_changed=0.5)
    encoder.begin()
    encoder.encode(0, v1, full=False)
    encoder.version = 1
    v2 = perturb(v1, 0.01, gen)
    payload = encoder.encode(0, v2, full=False)
    assert payload.kind == SPARSE and payload.changed > 0
    buf = torch.zeros(payload.nbytes, dtype=torch.uint8)
    payload.write_into(buf)
    return plan, v1, buf


@pytest.mark.parametrize("where", ["header", "indices", "values"])
def test_a_flipped_bit_anywhere_in_a_delta_is_caught_before_any_write(where):
    plan, v1, buf = _sparse_case()
    header = delta.read_header(buf)
    at = {
        "header": 20,
        "indices": delta.HEADER_BYTES + 5,
        "values": delta.HEADER_BYTES + header.body_nbytes - 3,
    }[where]
    buf[at] ^= 1 << 4
    store = {n: t.clone() for n, t in v1.items()}
    writer = writer_for(store)
    with pytest.raises(DeltaError, match="checksum mismatch"):
        delta.apply_region(0, plan.buckets[0], buf, writer)
    assert not writer.touched
    assert_equal_bytes(store, v1)


def test_a_store_that_does_not_hold_the_base_refuses_the_delta_untouched():
    plan, v1, buf = _sparse_case()
    header = delta.read_header(buf)
    first = int(buf[delta.HEADER_BYTES : delta.HEADER_BYTES + 4].view(torch.int32)[0])
    assert header.count > 0
    store = {n: t.clone() for n, t in v1.items()}
    store["a"].view(-1)[first] += 1.0  # the engine's byte at a changed position differs
    before = {n: t.clone() for n, t in store.items()}
    writer = writer_for(store)
    with pytest.raises(DeltaError, match="differ from the pusher's base"):
        delta.apply_region(0, plan.buckets[0], buf, writer)
    assert not writer.touched
    assert_equal_bytes(store, before)


def test_a_payload_for_another_bucket_or_plan_is_refused():
    plan, v1, buf = _sparse_case()
    other = make_plan({n: torch.bfloat16 for n in SHAPES}, bucket_bytes=1 << 20)
    with pytest.raises(DeltaError, match="the plan's is"):
        delta.apply_region(0, other.buckets[0], buf, writer_for({}))
    with pytest.raises(DeltaError, match="names bucket 0"):
        delta.apply_region(1, plan.buckets[0], buf, writer_for({}))
    with pytest.raises(DeltaError, match="body of"):
        delta.apply_region(0, plan.buckets[0], buf[:-8], writer_for({}))


def test_a_cancelled_writer_stops_a_delta():
    plan, v1, buf = _sparse_case()
    writer = writer_for({n: t.clone() for n, t in v1.items()})
    writer.cancel.set()
    with pytest.raises(Exception, match="cancelled"):
        delta.apply_region(0, plan.buckets[0], buf, writer)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("two_level", [False, True])
def test_changes_finds_exactly_the_differing_positions_and_values(two_level, dtype):
    gen = torch.Generator().manual_seed(4)
    for n in (0, 5, 63, 64, 1001, 4096):
        base = torch.randint(-100, 100, (n,), generator=gen).to(dtype)
        new = base.clone()
        hit = torch.rand(n, generator=gen) < 0.05
        new[hit] += 1
        expected = hit.nonzero().squeeze(1)
        idx, values, was = changes(new, base, two_level)
        assert torch.equal(idx, expected)
        assert torch.equal(values, new[expected]) and torch.equal(was, base[expected])


def test_a_bucket_denser_than_max_changed_goes_whole():
    dtypes = {n: torch.float32 for n in SHAPES}
    gen = torch.Generator().manual_seed(5)
    plan = make_plan(dtypes, bucket_bytes=1 << 20)
    v1 = random_weights(dtypes, gen)
    v2 = perturb(v1, 0.1, gen)
    for max_changed, kind in ((0.05, RAW), (0.5, SPARSE)):
        encoder = DeltaEncoder(plan, max_changed=max_changed)
        encoder.encode(0, v1, full=False)
        encoder.version = 1
        assert encoder.encode(0, v2, full=False).kind == kind


def test_fp32_weights_pushed_to_bf16_engines_are_compared_after_the_cast():
    """An fp32 trainer, bf16 engines: the changes that matter are those of the bf16 values;
    a tiny fp32 step that rounds away costs (almost) nothing on the wire."""
    dtypes = {n: torch.bfloat16 for n in SHAPES}
    gen = torch.Generator().manual_seed(6)
    plan = make_plan(dtypes)
    master = random_weights({n: torch.float32 for n in SHAPES}, gen)
    store = {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in SHAPES.items()}
    encoder = DeltaEncoder(plan, max_changed=0.5)
    apply_all(encoder, plan, master, writer_for(store))
    encoder.version = 1
    encoder.begin()
    nudged = {n: t * (1 + 1e-6) for n, t in master.items()}  # far below bf16's resolution
    apply_all(encoder, plan, nudged, writer_for(store))
    assert encoder.stats.changed_units < encoder.stats.units * 0.001  # a rounding edge or so
    assert_equal_bytes(store, {n: t.to(torch.bfloat16) for n, t in nudged.items()})
    moved = perturb(master, 0.05, gen)
    encoder.begin()
    apply_all(encoder, plan, moved, writer_for(store))
    assert_equal_bytes(store, {n: t.to(torch.bfloat16) for n, t in moved.items()})
    assert 0 < encoder.stats.changed_fraction < 0.1
