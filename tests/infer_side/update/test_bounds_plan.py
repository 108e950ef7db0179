"""Plans bounded by the model (issue 19, cause 7): a bucket larger than its tensors plus
alignment padding, or a plan larger than the engine's store, is refused by name before the
engine allocates anything, and the engine keeps serving the weights it had.

Before the fix a plan was bounded only by 16 TiB: a buggy pusher's bucket of a TiB passed
validation and the receiver allocated a staging buffer of that size and died.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from infer_side.engines.weights import ModelWeights
from infer_side.process.client import EngineClient, launch_engine
from infer_side.update.update_job import PlanCache, store_limit
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import PlanError, plan_buckets, plan_in_store, validate_plan
from rlsync.wire.protocol import (
    Bucket,
    BucketPlan,
    TensorSpec,
    UpdateDone,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC,
    failed,
)
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.timeout(180)

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
TIB = 1 << 40


def specs_of(expected: dict[str, tuple[str, tuple[int, ...]]]) -> list[tuple]:
    return [(n, d, s) for n, (d, s) in expected.items()]


def bloated_bucket(plan: BucketPlan, b: int, extra: int = TIB) -> BucketPlan:
    """`plan` with bucket b claiming `extra` more bytes than its tensors need."""
    buckets = list(plan.buckets)
    buckets[b] = dataclasses.replace(buckets[b], nbytes=buckets[b].nbytes + extra)
    return dataclasses.replace(plan, buckets=buckets)


def past_the_store(plan: BucketPlan) -> BucketPlan:
    """`plan` plus one honest bucket (its size fits its tensor) of a tensor far larger than
    the whole model: each bucket passes on its own, the plan does not fit the engine."""
    huge = TensorSpec(name="extra.weight", dtype="float32", shape=[1 << 36], offset=0)
    huge = dataclasses.replace(huge, nbytes=4 << 36)
    return dataclasses.replace(
        plan, buckets=[*plan.buckets, Bucket(nbytes=4 << 36, tensors=[huge])]
    )


# ---------------------------------------------------------------- the plan checks


@pytest.fixture(scope="module")
def weights() -> Iterator[ModelWeights]:
    w = ModelWeights.empty(CFG, torch.bfloat16)
    yield w
    w.close()


def test_a_plan_of_the_model_fits_within_its_bounds(weights):
    plan = plan_buckets(specs_of(weights.expected()), bucket_bytes=4096)
    total = validate_plan(plan, max_bytes=store_limit(weights, plan.alignment))
    assert total == sum(b.nbytes for b in plan.buckets)


def test_an_in_store_plan_of_the_model_fits_within_its_bounds():
    store = ModelWeights.empty(CFG, torch.bfloat16, exposed=True)
    try:
        offsets = {n: off for n, (off, _) in store.layout().items()}
        for bucket_bytes in (1, 4096, 1 << 30):  # a bucket per tensor up to one bucket in all
            plan = plan_in_store(specs_of(store.expected()), offsets, bucket_bytes)
            validate_plan(plan, max_bytes=store_limit(store, plan.alignment))
            assert PlanCache().resolve(UpdateWeightsFromIPC(plan=plan), store) == plan
    finally:
        store.close()


def test_a_bucket_larger_than_its_tensors_plus_padding_is_refused_naming_it(weights):
    plan = plan_buckets(specs_of(weights.expected()), bucket_bytes=4096)
    assert len(plan.buckets) > 2
    with pytest.raises(
        PlanError, match=r"^bucket 1: nbytes \d+ exceeds its \d+ tensors' \d+ bytes"
    ):
        validate_plan(bloated_bucket(plan, 1))
    with pytest.raises(PlanError, match=r"^bucket 2: nbytes"):  # one alignment unit past the bound
        validate_plan(bloated_bucket(plan, 2, extra=256 * (len(plan.buckets[2].tensors) + 1)))


def test_a_plan_larger_than_the_engines_store_is_refused_naming_the_bucket(weights):
    plan = plan_buckets(specs_of(weights.expected()), bucket_bytes=4096)
    n = len(plan.buckets)
    with pytest.raises(PlanError, match=rf"^bucket {n}: plan total \d+ bytes exceeds the receiver"):
        validate_plan(past_the_store(plan), max_bytes=store_limit(weights, plan.alignment))


@pytest.mark.parametrize("bad", ["bucket", "store"])
def test_plan_cache_refuses_an_oversized_plan_and_keeps_nothing(weights, bad):
    plans = PlanCache()
    good = plan_buckets(specs_of(weights.expected()), bucket_bytes=4096)
    plans.resolve(UpdateWeightsFromIPC(plan=good), weights)
    plan = bloated_bucket(good, 0) if bad == "bucket" else past_the_store(good)
    with pytest.raises(PlanError, match=r"^bucket \d+: "):
        plans.resolve(UpdateWeightsFromIPC(plan=plan), weights)
    assert list(plans.plans.values()) == [good]


# ---------------------------------------------------------------- a real engine process


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineClient]:
    ckpt: Path = make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))
    with launch_engine(ckpt, kv_tokens=1024, threads=1, call_timeout_s=60) as client:
        yield client


def engine_plan(engine: EngineClient) -> BucketPlan:
    specs = engine.weight_specs().specs
    return plan_buckets([(s.name, s.dtype, s.shape) for s in specs], bucket_bytes=8192)


def state(engine: EngineClient) -> tuple:
    """Everything a refused update must leave as it was: version, fingerprints, tokens."""
    prints = engine.fingerprints()
    tokens = [o.output_ids for o in engine.generate([[1, 2, 3], [7, 8]])]
    return engine.info().weight_version, prints, tokens


BAD_UPDATES = {
    "ipc bucket": lambda p: UpdateWeightsFromIPC(weight_version=1, plan=bloated_bucket(p, 1)),
    "broadcast bucket": lambda p: UpdateWeightsFromDistributed(
        weight_version=1, plan=bloated_bucket(p, 1)
    ),
    "ipc store": lambda p: UpdateWeightsFromIPC(weight_version=1, plan=past_the_store(p)),
}


@pytest.mark.parametrize("make", BAD_UPDATES.values(), ids=BAD_UPDATES.keys())
def test_a_real_engine_refuses_an_oversized_plan_by_name_and_keeps_serving(engine, make):
    before = state(engine)
    plan = engine_plan(engine)
    reply = engine.rpc.call(make(plan), timeout_s=30)
    assert isinstance(reply, UpdateDone) and not reply.success, reply
    bucket = 1 if len(make(plan).plan.buckets) == len(plan.buckets) else len(plan.buckets)
    assert f"bucket {bucket}: " in (failed(reply) or ""), failed(reply)
    assert reply.weight_version == 0
    assert engine.process is not None and engine.process.poll() is None
    assert state(engine) == before
