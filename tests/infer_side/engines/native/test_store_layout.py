"""The engine's flat weight store and its published layout: every Hugging Face tensor (the
q/k/v and gate/up rows of the fused projections too) is one contiguous byte range of one
buffer; a plan that follows the layout lands every tensor on its own bytes, cast on the
write; a plan that would write outside a tensor's range is refused by name."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from infer_side.engines.weights import STORE_ALIGNMENT, ModelWeights
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import (
    PlanError,
    in_store,
    pack_bucket,
    plan_buckets,
    plan_in_store,
    validate_placement,
)
from rlsync.transports import TransportError
from rlsync.transports.control import SHM_DIR
from rlsync.transports.store import MappedStore

CFG = ModelConfig(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    attention_bias=True,
    tie_word_embeddings=False,
)


def _trainer(weights: ModelWeights, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        for n, (_, shape) in weights.expected().items()
    }


def _plan(weights: ModelWeights, bucket_bytes: int = 8192):
    specs = [(n, d, s) for n, (d, s) in weights.expected().items()]
    offsets = {n: off for n, (off, _) in weights.layout().items()}
    return plan_in_store(specs, offsets, bucket_bytes)


@pytest.fixture
def store():
    weights = ModelWeights.empty(CFG, torch.bfloat16, exposed=True)
    yield weights
    weights.close()


def test_every_tensor_is_one_contiguous_range_of_one_flat_buffer(store):
    flat = store.flat
    placement = store.placement()
    spans = sorted((off, off + n, name) for name, (off, n) in placement.items())
    for (_, end, _), (nxt, _, name) in zip(spans, spans[1:], strict=False):
        assert end <= nxt, f"{name} overlaps the tensor before it"
    for name, view in store.hf_views().items():
        off, nbytes = placement[name]
        assert view.is_contiguous()
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert view.data_ptr() - flat.data_ptr() == off and view.nbytes == nbytes
    qkv = "model.layers.1.self_attn.{}_proj.weight"
    q, k, v = (placement[qkv.format(x)] for x in "qkv")
    assert q[0] % STORE_ALIGNMENT == 0 and k[0] == q[0] + q[1] and v[0] == k[0] + k[1]
    assert store.layout()[qkv.format("q")][1] == (CFG.q_size, CFG.hidden_size)[1:] + (1,)
    assert flat.numel() % STORE_ALIGNMENT == 0 and flat.numel() >= max(e for _, e, _ in spans)


def test_an_exposed_store_is_shared_memory_another_mapping_writes(store):
    ref = store.store_ref
    assert ref is not None and ref.kind == "shm" and ref.nbytes == store.flat.numel()
    assert os.path.exists(os.path.join(SHM_DIR, ref.name))
    mapped = MappedStore(ref)
    try:
        name = "model.norm.weight"
        off, nbytes = store.placement()[name]
        mapped.flat[off : off + nbytes].view(torch.bfloat16).fill_(1.5)
        assert torch.equal(store.hf_views()[name], torch.full((CFG.hidden_size,), 1.5).bfloat16())
    finally:
        mapped.close()
    shadow = store.clone_empty()
    assert shadow.store_ref is not None and shadow.store_ref.name != ref.name
    assert shadow.layout() == store.layout()
    shadow.close()
    assert not os.path.exists(os.path.join(SHM_DIR, shadow.store_ref.name))
    with pytest.raises(TransportError, match="cannot open"):
        MappedStore(shadow.store_ref)


def test_a_private_store_publishes_no_ref():
    weights = ModelWeights.empty(CFG, torch.float32)
    assert weights.store_ref is None and weights.flat is not None


@pytest.mark.parametrize("trainer_dtype", [torch.float32, torch.bfloat16])
def test_a_plan_in_the_layout_lands_every_tensor_bit_exact(store, trainer_dtype):
    plan = _plan(store)
    assert in_store(plan) and len(plan.buckets) > 1
    validate_placement(plan, store.placement(), store.flat.numel())
    tensors = _trainer(store, trainer_dtype, seed=3)
    mapped = MappedStore(store.store_ref)
    try:
        for bucket in plan.buckets:
            start = bucket.store_offset
            pack_bucket(bucket, tensors, mapped.flat[start : start + bucket.nbytes])
    finally:
        mapped.close()
    for name, view in store.hf_views().items():
        assert torch.equal(view, tensors[name].to(torch.bfloat16)), name
    reference = ModelWeights.empty(CFG, torch.bfloat16)
    reference.load([(n, t.to(torch.bfloat16)) for n, t in tensors.items()])
    assert store.fingerprints() == reference.fingerprints()


def _shift(plan, bucket: int, tensor: int, by: int):
    out = dataclasses.replace(plan, buckets=list(plan.buckets))
    b = out.buckets[bucket]
    specs = list(b.tensors)
    specs[tensor] = dataclasses.replace(specs[tensor], offset=specs[tensor].offset + by)
    out.buckets[bucket] = dataclasses.replace(b, tensors=specs)
    return out


def test_placement_refuses_a_plan_that_writes_outside_a_tensor(store):
    plan = _plan(store)
    size, placement = store.flat.numel(), store.placement()
    with pytest.raises(PlanError, match=r"bucket 0 tensor .*would write bytes"):
        validate_placement(_shift(plan, 0, 0, 256), placement, size)
    # a bucket that still spans a tensor it no longer carries would zero that tensor's bytes
    first = plan.buckets[0]
    dropped = dataclasses.replace(first, tensors=first.tensors[1:])
    hole = dataclasses.replace(plan, buckets=[dropped, *plan.buckets[1:]])
    with pytest.raises(PlanError, match=f"overlaps tensor '{first.tensors[0].name}'"):
        validate_placement(hole, placement, size)
    last = plan.buckets[-1]
    past = dataclasses.replace(last, store_offset=size - last.nbytes + 256)
    with pytest.raises(PlanError, match="past the store"):
        validate_placement(dataclasses.replace(plan, buckets=[past]), placement, size)
    packed = plan_buckets([(n, d, s) for n, (d, s) in store.expected().items()])
    with pytest.raises(PlanError, match="no store_offset"):
        validate_placement(packed, placement, size)


def test_solo_tensors_get_a_bucket_each_and_the_rest_stay_grouped(store):
    specs = [(n, d, s) for n, (d, s) in store.expected().items()]
    offsets = {n: off for n, (off, _) in store.layout().items()}
    plan = plan_in_store(specs, offsets, bucket_bytes=1 << 20, solo_bytes=4096)
    validate_placement(plan, store.placement(), store.flat.numel())
    for bucket in plan.buckets:
        big = [s for s in bucket.tensors if s.nbytes >= 4096]
        assert not big or len(bucket.tensors) == 1
    small = [b for b in plan.buckets if b.tensors[0].nbytes < 4096]
    assert any(len(b.tensors) > 1 for b in small)  # small ones still share buckets
