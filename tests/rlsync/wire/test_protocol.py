"""Protocol messages through the codec: exact round trips, and every way a frame can be bad.

Each bad frame must raise `ProtocolError` whose `where` names the message and field, so an
engine can send back an error reply that says what was wrong.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from rlsync.wire import codec
from rlsync.wire import protocol as p
from rlsync.wire.codec import ProtocolError, decode, encode

PLAN = p.BucketPlan(
    alignment=512,
    buckets=[
        p.Bucket(
            nbytes=1536,
            tensors=[
                p.TensorSpec(
                    name="model.embed_tokens.weight",
                    dtype="bfloat16",
                    shape=[4, 8],
                    offset=512,
                    nbytes=64,
                ),
                p.TensorSpec(
                    name="lm_head.scale", dtype="float32", shape=[], offset=1024, nbytes=4
                ),
            ],
            store_offset=0,
        ),
        p.Bucket(
            nbytes=1024,
            tensors=[
                p.TensorSpec(
                    name="model.norm.weight",
                    dtype="float8_e4m3fn",
                    shape=[2, 3],
                    offset=512,
                    nbytes=6,
                ),
            ],
            store_offset=1 << 33,
        ),
    ],
)
PLAN_ID = p.plan_id_of(PLAN)
# The one field left at its default on purpose: a 0-dim tensor's shape is [].
INTENDED_DEFAULTS = {
    "UpdateWeightsFromDistributed.delta.plan.buckets[0].tensors[1].shape",
    "UpdateWeightsFromIPC.delta.plan.buckets[0].tensors[1].shape",
    "UpdateWeightsFromDisk.delta.plan.buckets[0].tensors[1].shape",
    "UpdateWeightsFromDistributed.plan.buckets[0].tensors[1].shape",
    "UpdateWeightsFromIPC.plan.buckets[0].tensors[1].shape",
    "WeightSpecs.specs[1].shape",
    "WeightSpecs.specs[1].strides",
}
UPDATE = dict(
    weight_version=7,
    flush_cache=False,
    torch_empty_cache=True,
    load_mode="shadow",
    pause_mode="retract",
    idle_timeout_s=1.5,
    timeout_s=9.25,
    verify=True,
    delta=p.DeltaInfo(base_version=6, plan_id=PLAN_ID, plan=PLAN),
    commit="atomic",
    commit_timeout_s=12.5,
)
BUFFER = p.IpcBuffer(
    kind="cuda",
    name="rlsync-slots-1",
    control_name="rlsync-ctl-1",
    nbytes=4096,
    num_slots=2,
    slot_bytes=2048,
    engine_index=3,
    cuda=p.CudaShare(
        gpu_uuid="GPU-8f1c",
        handle=bytes(range(64)),
        storage_offset=512,
        ref_counter_handle=b"\x01" * 64,
        ref_counter_offset=8,
        event_handle=b"\x02" * 64,
        event_sync_required=True,
    ),
)
SAMPLING = p.SamplingParams(
    max_new_tokens=7,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=(1 << 63) - 1,
    stop_token_ids=[2, 0],
)
# EngineInfo.model is the one free-form map (msgpack natives of any shape).
MODEL = {
    "timings": {"load_s": 0.5, "steps": [1, 2]},
    "names": ["a", "b"],
    "blob": b"\x00\xff",
    "none": None,
    "nested": [[1, [2, b"x", None]], {"k": True}],
    "neg": -3,
    "big": (1 << 64) - 1,
    "": "",
}

SAMPLES: dict[str, p.Message] = {
    m.__class__.__name__: m
    for m in (
        p.Generate(request_id="g-1", input_ids=[1, 2, 3, 1 << 20], sampling=SAMPLING, stream=True),
        p.GenerateOutput(
            request_id="g-1",
            output_ids=[5, 6],
            logprobs=[-0.25, -1e-30],
            finished=False,
            finish_reason="length",
            prompt_tokens=4,
            cached_tokens=2,
            weight_version=9,
            min_weight_version=8,
            version_spans=[p.VersionSpan(version=9, tokens=2)],
            error="boom \u00fc\u4e2d",
        ),
        p.Result(request_id="r-1", success=False, message="no"),
        p.EngineDied(request_id="r-2", message="engine crashed: RuntimeError: boom"),
        p.UpdateAccepted(
            request_id="u-1",
            weight_version=7,
            bytes=1 << 40,
            store=p.StoreRef(kind="cuda", name="store-1", nbytes=1 << 34, cuda=BUFFER.cuda),
        ),
        p.UpdateDone(
            request_id="u-1",
            success=False,
            message="timed out",
            weight_version=6,
            bytes=2560,
            transport="ipc",
            timings=p.UpdateTimings(
                total_s=2.5, recv_s=1.25, load_s=0.5, flush_s=0.125, pause_ms=37.5
            ),
            live_touched=True,
            weights_incomplete=True,
            unknown_plan=True,
            committed_at=1_790_000_000.25,
        ),
        p.UpdateReady(request_id="u-1", weight_version=7, bytes=2560),
        p.WeightSpecs(
            request_id="ws-1",
            weight_version=3,
            specs=[
                p.WeightSpec(
                    name="model.embed_tokens.weight",
                    dtype="bfloat16",
                    shape=[4, 8],
                    offset=256,
                    strides=[8, 1],
                ),
                p.WeightSpec(name="lm_head.scale", dtype="float32", shape=[], offset=0),
            ],
            store_bytes=512,
        ),
        p.WeightFingerprints(
            request_id="w-1",
            weight_version=4,
            fingerprints={"lm_head.weight": -(1 << 63), "model.norm.weight": 17},
            weights_incomplete=True,
            update_in_progress=True,
        ),
        p.EngineInfo(
            request_id="n-1",
            weight_version=5,
            model=MODEL,
            backend="sglang",
            kv_pool_size=2048,
            kv_pool_used=96,
            prefix_cache_tokens=64,
            waiting=2,
            running=3,
            paused="retract",
            weights_incomplete=True,
            admission_held=True,
            retracted=1,
            disk_root="/srv/weights",
        ),
        p.Abort(request_id="a-1", target_id="g-1"),
        p.InitWeightsGroup(
            request_id="i-1",
            master_address="10.0.0.2",
            master_port=29500,
            rank_offset=3,
            world_size=5,
            group_name="w2",
            backend="nccl",
            timeout_s=12.5,
            senders=2,
        ),
        p.DestroyWeightsGroup(request_id="d-1", group_name="w2"),
        p.UpdateWeightsFromDistributed(
            request_id="u-1",
            group_name="w2",
            plan_id=PLAN_ID,
            plan=PLAN,
            rows={"model.norm.weight": [0, 4, 8]},
            **UPDATE,
        ),
        p.UpdateWeightsFromIPC(
            request_id="u-2", buffer=BUFFER, plan_id=PLAN_ID, plan=PLAN, push_id=11, **UPDATE
        ),
        p.UpdateWeightsFromDisk(request_id="u-3", path="/tmp/ckpt/step-7", **UPDATE),
        p.CommitUpdate(request_id="cu-1", weight_version=7),
        p.AbortUpdate(request_id="au-1", weight_version=7),
        p.FlushCache(request_id="f-1", empty_cache=False),
        p.PauseGeneration(request_id="p-1", mode="in_place"),
        p.ContinueGeneration(request_id="c-1"),
        p.GetWeightsFingerprint(request_id="w-1", names=["lm_head.weight", "model.norm.weight"]),
        p.GetWeightSpecs(request_id="ws-1"),
        p.GetInfo(request_id="n-1"),
        p.Shutdown(request_id="s-1"),
    )
}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _fields_left_default(obj: Any, where: str) -> list[str]:
    """Paths of fields (nested ones too) whose value still equals the field's default."""
    left = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value == _default(f):
            left.append(f"{where}.{f.name}")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if dataclasses.is_dataclass(item):
                suffix = f"[{i}]" if isinstance(value, list) else ""
                left += _fields_left_default(item, f"{where}.{f.name}{suffix}")
    return left


def _raw(msg: p.Message) -> list:
    return msgpack.unpackb(encode(msg), raw=False)


def _frame(raw: Any) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)


def _mutated(name: str, path: tuple, value: Any) -> bytes:
    """A valid sample's frame with the value at `path` (inside its field map) replaced."""
    raw = _raw(SAMPLES[name])
    node = raw[1]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return _frame(raw)


def _where(frame: bytes, **kw: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **kw)
    assert str(info.value).startswith(info.value.where + ": ")
    return info.value.where


# ---------------------------------------------------------------- round trips


def test_samples_cover_every_message_type():
    assert sorted(SAMPLES) == sorted(p.MESSAGE_TYPES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_set_every_field_to_a_non_default(name):
    assert set(_fields_left_default(SAMPLES[name], name)) <= INTENDED_DEFAULTS


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_is_exact(name):
    msg = SAMPLES[name]
    frame = encode(msg)
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == frame


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_defaults_round_trip_unless_a_field_is_required(name):
    cls = p.MESSAGE_TYPES[name]
    if cls is p.InitWeightsGroup:  # master_port's default 0 is outside its range 1..65535
        with pytest.raises(ProtocolError, match="master_port"):
            decode(encode(cls()))
    else:
        assert decode(encode(cls())) == cls()


def test_frame_is_type_name_then_field_map_with_bin_bytes():
    raw = _raw(SAMPLES["UpdateWeightsFromIPC"])
    assert raw[0] == "UpdateWeightsFromIPC"
    assert raw[1]["buffer"]["cuda"]["handle"] == bytes(range(64))  # bin type, not str
    assert raw[1]["plan"]["buckets"][0]["tensors"][1] == {
        "name": "lm_head.scale",
        "dtype": "float32",
        "shape": [],
        "offset": 1024,
        "nbytes": 4,
    }
    assert set(raw[1]) == {f.name for f in dataclasses.fields(p.UpdateWeightsFromIPC)}


@pytest.mark.parametrize("name", ["UpdateWeightsFromDistributed", "UpdateWeightsFromIPC"])
def test_update_may_carry_only_the_plan_id(name):
    msg = dataclasses.replace(SAMPLES[name], plan=None)
    raw = _raw(msg)
    assert raw[1]["plan"] is None and raw[1]["plan_id"] == PLAN_ID
    assert decode(encode(msg)) == msg


def test_plan_id_is_a_content_hash():
    copy = decode(encode(SAMPLES["UpdateWeightsFromIPC"])).plan
    assert copy is not PLAN and p.plan_id_of(copy) == PLAN_ID
    assert len(PLAN_ID) == 32 and int(PLAN_ID, 16) >= 0
    moved = decode(
        _mutated("UpdateWeightsFromIPC", ("plan", "buckets", 0, "tensors", 1, "offset"), 768)
    ).plan
    assert p.plan_id_of(moved) != PLAN_ID
    assert p.plan_id_of(dataclasses.replace(PLAN, alignment=256)) != PLAN_ID
    assert p.plan_id_of(p.BucketPlan()) != PLAN_ID


@pytest.mark.parametrize(
    "msg, final",
    [
        (p.UpdateAccepted(weight_version=3), False),
        (p.UpdateReady(weight_version=3), False),
        (p.GenerateOutput(finished=False), False),
        (p.GenerateOutput(finished=True), True),
        (p.UpdateDone(success=False), True),
        (p.Result(), True),
        (p.EngineDied(), True),
        (p.EngineInfo(), True),
        (p.WeightFingerprints(), True),
        (p.WeightSpecs(), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, p.Message) else str(v),
)
def test_is_final(msg, final):
    assert p.is_final(msg) is final


@pytest.mark.parametrize(
    "msg, failure",
    [
        (p.Result(success=False, message="no"), "no"),
        (p.Result(success=True, message="fine"), None),
        (p.UpdateDone(success=False, message="timed out"), "timed out"),
        (p.UpdateDone(success=True, message="ok"), None),
        (p.EngineDied(message="engine crashed: boom"), "engine crashed: boom"),
        (p.GenerateOutput(error="refused"), "refused"),
        (p.GenerateOutput(), None),
        (p.UpdateAccepted(), None),
        (p.EngineInfo(weights_incomplete=True), None),
        (p.WeightFingerprints(weights_incomplete=True), None),
        (p.WeightSpecs(), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, p.Message) else repr(v),
)
def test_failed_is_the_failure_text_or_none(msg, failure):
    assert p.failed(msg) == failure


def test_int_for_float_field_is_accepted_as_float():
    back = decode(_mutated("Generate", ("sampling", "temperature"), 1))
    assert back.sampling.temperature == 1.0 and type(back.sampling.temperature) is float


def test_fields_left_out_take_their_defaults():
    back = decode(_frame(["Generate", {"input_ids": [4, 5]}]))
    assert back == p.Generate(input_ids=[4, 5])


@pytest.mark.parametrize("frame_type", [bytes, bytearray, memoryview])
def test_decode_accepts_any_bytes_like(frame_type):
    assert decode(frame_type(encode(SAMPLES["Abort"]))) == SAMPLES["Abort"]


def test_encode_refuses_a_non_message():
    with pytest.raises(ProtocolError) as info:
        encode(p.SamplingParams())
    assert info.value.where == "SamplingParams"


# ---------------------------------------------------------------- malformed frames


@pytest.mark.parametrize(
    "name", ["Generate", "UpdateWeightsFromIPC", "Result", "UpdateDone", "EngineInfo"]
)
def test_every_truncated_prefix_is_refused(name):
    frame = encode(SAMPLES[name])
    for n in range(len(frame)):
        with pytest.raises(ProtocolError) as info:
            decode(frame[:n])
        assert info.value.where == "frame"


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "Abort"},
        ["Abort"],
        ["Abort", {}, {}],
        [7, {}],
        "Abort",
        None,
        [b"Abort", {}],
    ],
    ids=repr,
)
def test_frame_must_be_a_name_and_a_map(raw):
    assert _where(_frame(raw)) == "frame"


def test_fields_must_be_a_map():
    assert _where(_frame(["Abort", ["a-1", "g-1"]])) == "Abort"


@pytest.mark.parametrize("junk", ["not bytes", 12, None, ["Abort", {}]], ids=repr)
def test_non_bytes_input_is_refused(junk):
    with pytest.raises(ProtocolError, match="expected bytes"):
        decode(junk)


@pytest.mark.parametrize(
    "frame", [b"", b"\xc1", b"\x92\xa5Abort", b"\xdc\xff\xff", b"\xff" * 9], ids=repr
)
def test_not_msgpack_is_refused(frame):
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode(frame)


def test_trailing_bytes_after_a_frame_are_refused():
    assert _where(encode(SAMPLES["Abort"]) + b"\x00") == "frame"


def test_frame_over_the_size_limit_is_refused(monkeypatch):
    frame = encode(SAMPLES["Generate"])
    monkeypatch.setattr(codec, "MAX_FRAME_BYTES", len(frame) - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame)


@pytest.mark.parametrize(
    "name",
    [
        "Frobnicate",
        "Message",
        "UpdateWeights",
        "BucketUpdate",
        "SamplingParams",
        "BucketPlan",
        "TensorSpec",
        "UpdateTimings",
        "WeightSpec",
        "generate",
        "",
    ],
)
def test_unknown_message_type_is_refused(name):
    with pytest.raises(ProtocolError, match="unknown message type") as info:
        decode(_frame([name, {}]))
    assert info.value.where == "frame"


@pytest.mark.parametrize(
    "name, fields, where",
    [
        ("Abort", {"request_id": "a", "bogus": 1}, "Abort.bogus"),
        ("Generate", {"sampling": {"max_new_tokens": 2, "top_q": 0.5}}, "Generate.sampling.top_q"),
        (
            "UpdateWeightsFromDistributed",
            {"plan": {"buckets": [{"nbytes": 256, "crc": 0}]}},
            "UpdateWeightsFromDistributed.plan.buckets[0].crc",
        ),
        ("Abort", {b"request_id": "a"}, "Abort.b'request_id'"),
        ("Result", {"payload": {"stage": "accepted"}}, "Result.payload"),
        ("UpdateDone", {"timings": {"wait_s": 1.0}}, "UpdateDone.timings.wait_s"),
        (
            "WeightSpecs",
            {"specs": [{"name": "w", "dtype": "float32", "store": 0}]},
            "WeightSpecs.specs[0].store",
        ),
        ("EngineInfo", {"kv_pool": {"size": 1}}, "EngineInfo.kv_pool"),
    ],
)
def test_unknown_field_is_refused_by_name(name, fields, where):
    with pytest.raises(ProtocolError, match="unknown field") as info:
        decode(_frame([name, fields]))
    assert info.value.where == where


def test_unknown_fields_of_mixed_key_types_give_a_protocol_error():
    # Keys may be msgpack str or bin; sorting a mix of both used to raise TypeError.
    with pytest.raises(ProtocolError, match="unknown field"):
        decode(_frame(["Abort", {b"zz": 1, "yy": 2}]))


def _tensor_without(key: str) -> bytes:
    raw = _raw(SAMPLES["UpdateWeightsFromDistributed"])
    del raw[1]["plan"]["buckets"][0]["tensors"][1][key]
    return _frame(raw)


@pytest.mark.parametrize(
    "frame, where",
    [
        (_tensor_without("name"), "UpdateWeightsFromDistributed.plan.buckets[0].tensors[1].name"),
        (_tensor_without("dtype"), "UpdateWeightsFromDistributed.plan.buckets[0].tensors[1].dtype"),
        (_frame(["InitWeightsGroup", {"world_size": 3}]), "InitWeightsGroup.master_port"),
        (_frame(["WeightSpecs", {"specs": [{"dtype": "float32"}]}]), "WeightSpecs.specs[0].name"),
        (_frame(["WeightSpecs", {"specs": [{"name": "w"}]}]), "WeightSpecs.specs[0].dtype"),
    ],
    ids=["tensor-name", "tensor-dtype", "master-port", "spec-name", "spec-dtype"],
)
def test_missing_required_field_is_refused_by_name(frame, where):
    # A field is optional on the wire only when its default is itself a valid value.
    with pytest.raises(ProtocolError, match="required field missing") as info:
        decode(frame)
    assert info.value.where == where


WRONG_TYPES = [
    ("Generate", ("sampling", "max_new_tokens"), "5", "Generate.sampling.max_new_tokens"),
    ("Generate", ("sampling", "max_new_tokens"), 5.0, "Generate.sampling.max_new_tokens"),
    ("Generate", ("sampling", "top_k"), True, "Generate.sampling.top_k"),
    ("Generate", ("sampling", "seed"), [1], "Generate.sampling.seed"),
    ("Generate", ("sampling", "temperature"), "hot", "Generate.sampling.temperature"),
    ("Generate", ("sampling", "temperature"), False, "Generate.sampling.temperature"),
    ("Generate", ("sampling",), [16, 0.0], "Generate.sampling"),
    ("Generate", ("stream",), 1, "Generate.stream"),
    ("Generate", ("stream",), None, "Generate.stream"),
    ("Generate", ("input_ids",), {"0": 1}, "Generate.input_ids"),
    ("Generate", ("input_ids", 1), "2", "Generate.input_ids[1]"),
    ("Generate", ("input_ids", 2), 3.0, "Generate.input_ids[2]"),
    ("Result", ("success",), 0, "Result.success"),
    ("Result", ("message",), None, "Result.message"),
    ("EngineDied", ("message",), b"boom", "EngineDied.message"),
    ("UpdateAccepted", ("bytes",), 1.5, "UpdateAccepted.bytes"),
    ("UpdateAccepted", ("weight_version",), "7", "UpdateAccepted.weight_version"),
    ("UpdateDone", ("success",), None, "UpdateDone.success"),
    ("UpdateDone", ("transport",), "rdma", "UpdateDone.transport"),
    ("UpdateDone", ("timings",), [2.5, 1.25], "UpdateDone.timings"),
    ("UpdateDone", ("timings", "load_s"), "slow", "UpdateDone.timings.load_s"),
    ("UpdateDone", ("unknown_plan",), 1, "UpdateDone.unknown_plan"),
    ("WeightSpecs", ("specs",), {"w": ["float32", [2]]}, "WeightSpecs.specs"),
    ("WeightSpecs", ("specs", 0, "shape", 1), 8.0, "WeightSpecs.specs[0].shape[1]"),
    ("WeightSpecs", ("specs", 1, "dtype"), None, "WeightSpecs.specs[1].dtype"),
    (
        "WeightFingerprints",
        ("fingerprints",),
        [["lm_head.weight", 1]],
        "WeightFingerprints.fingerprints",
    ),
    (
        "WeightFingerprints",
        ("fingerprints", "model.norm.weight"),
        "17",
        "WeightFingerprints.fingerprints.model.norm.weight",
    ),
    ("WeightFingerprints", ("update_in_progress",), "yes", "WeightFingerprints.update_in_progress"),
    ("EngineInfo", ("model",), [["k", 1]], "EngineInfo.model"),
    ("EngineInfo", ("model",), None, "EngineInfo.model"),
    ("EngineInfo", ("model", "blob"), msgpack.ExtType(3, b"xy"), "EngineInfo.model.blob"),
    (
        "EngineInfo",
        ("model", "nested", 1),
        {"k": msgpack.Timestamp(1, 0)},
        "EngineInfo.model.nested[1].k",
    ),
    ("EngineInfo", ("model", "timings"), {b"load_s": 1.0}, "EngineInfo.model.timings"),
    ("EngineInfo", ("paused",), "drain", "EngineInfo.paused"),
    ("EngineInfo", ("admission_held",), None, "EngineInfo.admission_held"),
    ("EngineInfo", ("kv_pool_size",), {"size": 2048}, "EngineInfo.kv_pool_size"),
    ("Abort", ("target_id",), b"g-1", "Abort.target_id"),
    ("Abort", ("request_id",), 17, "Abort.request_id"),
    (
        "UpdateWeightsFromIPC",
        ("buffer", "cuda", "handle"),
        "handle",
        "UpdateWeightsFromIPC.buffer.cuda.handle",
    ),
    ("UpdateWeightsFromIPC", ("buffer", "kind"), "rdma", "UpdateWeightsFromIPC.buffer.kind"),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 0, "tensors", 0, "shape", 1),
        1.5,
        "UpdateWeightsFromIPC.plan.buckets[0].tensors[0].shape[1]",
    ),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 1),
        [512, []],
        "UpdateWeightsFromIPC.plan.buckets[1]",
    ),
    ("UpdateWeightsFromIPC", ("plan",), [], "UpdateWeightsFromIPC.plan"),
    ("UpdateWeightsFromIPC", ("plan_id",), None, "UpdateWeightsFromIPC.plan_id"),
    (
        "UpdateWeightsFromDistributed",
        ("plan_id",),
        b"\x00" * 16,
        "UpdateWeightsFromDistributed.plan_id",
    ),
    ("GetWeightSpecs", ("request_id",), 1, "GetWeightSpecs.request_id"),
    ("UpdateWeightsFromDisk", ("flush_cache",), "yes", "UpdateWeightsFromDisk.flush_cache"),
    ("UpdateWeightsFromDisk", ("pause_mode",), "drain", "UpdateWeightsFromDisk.pause_mode"),
    ("UpdateWeightsFromDisk", ("load_mode",), None, "UpdateWeightsFromDisk.load_mode"),
    ("PauseGeneration", ("mode",), {"a": 1}, "PauseGeneration.mode"),
    ("GenerateOutput", ("finish_reason",), "eos", "GenerateOutput.finish_reason"),
    ("GenerateOutput", ("logprobs", 0), "x", "GenerateOutput.logprobs[0]"),
    ("GetWeightsFingerprint", ("names", 0), 3, "GetWeightsFingerprint.names[0]"),
    ("GetWeightsFingerprint", ("names",), "lm_head.weight", "GetWeightsFingerprint.names"),
    ("InitWeightsGroup", ("backend",), "mpi", "InitWeightsGroup.backend"),
]


@pytest.mark.parametrize(
    "name, path, value, where", WRONG_TYPES, ids=[w[3] + "=" + repr(w[2]) for w in WRONG_TYPES]
)
def test_wrong_type_is_refused_by_name(name, path, value, where):
    assert _where(_mutated(name, path, value)) == where


OUT_OF_RANGE = [
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 0, "tensors", 0, "nbytes"),
        -1,
        "UpdateWeightsFromIPC.plan.buckets[0].tensors[0].nbytes",
    ),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 0, "tensors", 0, "offset"),
        -256,
        "UpdateWeightsFromIPC.plan.buckets[0].tensors[0].offset",
    ),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 1, "nbytes"),
        -512,
        "UpdateWeightsFromIPC.plan.buckets[1].nbytes",
    ),
    ("UpdateWeightsFromIPC", ("plan", "alignment"), 0, "UpdateWeightsFromIPC.plan.alignment"),
    ("UpdateWeightsFromIPC", ("buffer", "nbytes"), -4096, "UpdateWeightsFromIPC.buffer.nbytes"),
    ("UpdateWeightsFromIPC", ("buffer", "num_slots"), 0, "UpdateWeightsFromIPC.buffer.num_slots"),
    (
        "UpdateWeightsFromIPC",
        ("buffer", "engine_index"),
        4096,
        "UpdateWeightsFromIPC.buffer.engine_index",
    ),
    ("UpdateWeightsFromIPC", ("push_id",), -1, "UpdateWeightsFromIPC.push_id"),
    ("UpdateWeightsFromDisk", ("weight_version",), -1, "UpdateWeightsFromDisk.weight_version"),
    ("UpdateWeightsFromDisk", ("timeout_s",), 0.0, "UpdateWeightsFromDisk.timeout_s"),
    ("GenerateOutput", ("prompt_tokens",), -4, "GenerateOutput.prompt_tokens"),
    ("Generate", ("sampling", "max_new_tokens"), 0, "Generate.sampling.max_new_tokens"),
    (
        "Generate",
        ("sampling", "max_new_tokens"),
        p.MAX_TOKENS + 1,
        "Generate.sampling.max_new_tokens",
    ),
    ("Generate", ("sampling", "top_p"), 1.5, "Generate.sampling.top_p"),
    ("Generate", ("sampling", "temperature"), -0.1, "Generate.sampling.temperature"),
    ("Generate", ("sampling", "seed"), 1 << 63, "Generate.sampling.seed"),
    ("InitWeightsGroup", ("master_port",), 65536, "InitWeightsGroup.master_port"),
    ("InitWeightsGroup", ("world_size",), 1, "InitWeightsGroup.world_size"),
    ("InitWeightsGroup", ("rank_offset",), 0, "InitWeightsGroup.rank_offset"),
    ("UpdateAccepted", ("bytes",), -1, "UpdateAccepted.bytes"),
    ("UpdateAccepted", ("weight_version",), -7, "UpdateAccepted.weight_version"),
    ("UpdateDone", ("weight_version",), -1, "UpdateDone.weight_version"),
    ("UpdateDone", ("bytes",), -2560, "UpdateDone.bytes"),
    ("UpdateDone", ("timings", "pause_ms"), -37.5, "UpdateDone.timings.pause_ms"),
    ("UpdateDone", ("timings", "recv_s"), -1e-9, "UpdateDone.timings.recv_s"),
    ("WeightSpecs", ("weight_version",), -3, "WeightSpecs.weight_version"),
    ("WeightFingerprints", ("weight_version",), -4, "WeightFingerprints.weight_version"),
    ("EngineInfo", ("kv_pool_used",), -96, "EngineInfo.kv_pool_used"),
    ("EngineInfo", ("retracted",), -1, "EngineInfo.retracted"),
]


@pytest.mark.parametrize(
    "name, path, value, where", OUT_OF_RANGE, ids=[w[3] + "=" + repr(w[2]) for w in OUT_OF_RANGE]
)
def test_out_of_range_value_is_refused_by_name(name, path, value, where):
    assert _where(_mutated(name, path, value)) == where


NOT_FINITE = [
    ("Generate", ("sampling", "temperature"), "Generate.sampling.temperature"),
    ("Generate", ("sampling", "top_p"), "Generate.sampling.top_p"),
    ("GenerateOutput", ("logprobs", 1), "GenerateOutput.logprobs[1]"),
    ("UpdateWeightsFromDisk", ("timeout_s",), "UpdateWeightsFromDisk.timeout_s"),
    ("InitWeightsGroup", ("timeout_s",), "InitWeightsGroup.timeout_s"),
    ("UpdateDone", ("timings", "total_s"), "UpdateDone.timings.total_s"),
    ("UpdateDone", ("timings", "flush_s"), "UpdateDone.timings.flush_s"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize("name, path, where", NOT_FINITE, ids=[w[2] for w in NOT_FINITE])
def test_nan_and_inf_are_refused_by_name(name, path, where, value):
    with pytest.raises(ProtocolError, match="not finite") as info:
        decode(_mutated(name, path, value))
    assert info.value.where == where


TOO_LONG = [
    ("Abort", ("request_id",), "r" * 129, "Abort.request_id"),
    ("GenerateOutput", ("error",), "e" * 4097, "GenerateOutput.error"),
    ("Generate", ("sampling", "stop_token_ids"), [0] * 1025, "Generate.sampling.stop_token_ids"),
    ("Generate", ("input_ids",), [1] * (p.MAX_TOKENS + 1), "Generate.input_ids"),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 0, "tensors", 0, "shape"),
        [1] * 9,
        "UpdateWeightsFromIPC.plan.buckets[0].tensors[0].shape",
    ),
    (
        "UpdateWeightsFromIPC",
        ("plan", "buckets", 0, "tensors", 0, "name"),
        "n" * 513,
        "UpdateWeightsFromIPC.plan.buckets[0].tensors[0].name",
    ),
    (
        "UpdateWeightsFromIPC",
        ("buffer", "cuda", "handle"),
        b"h" * 257,
        "UpdateWeightsFromIPC.buffer.cuda.handle",
    ),
    ("UpdateWeightsFromIPC", ("buffer", "name"), "s" * 256, "UpdateWeightsFromIPC.buffer.name"),
    ("Result", ("message",), "m" * ((1 << 16) + 1), "Result.message"),
    ("EngineDied", ("message",), "m" * ((1 << 16) + 1), "EngineDied.message"),
    ("UpdateDone", ("message",), "m" * ((1 << 16) + 1), "UpdateDone.message"),
    ("UpdateWeightsFromIPC", ("plan_id",), "f" * 65, "UpdateWeightsFromIPC.plan_id"),
    ("WeightSpecs", ("specs", 0, "shape"), [1] * 9, "WeightSpecs.specs[0].shape"),
    ("WeightSpecs", ("specs", 0, "name"), "n" * 513, "WeightSpecs.specs[0].name"),
    (
        "WeightFingerprints",
        ("fingerprints",),
        {str(i): i for i in range((1 << 16) + 1)},
        "WeightFingerprints.fingerprints",
    ),
    ("EngineInfo", ("model",), {str(i): i for i in range(257)}, "EngineInfo.model"),
    ("EngineInfo", ("backend",), "b" * 65, "EngineInfo.backend"),
]


@pytest.mark.parametrize("name, path, value, where", TOO_LONG, ids=[w[3] for w in TOO_LONG])
def test_absurd_length_is_refused_by_name(name, path, value, where):
    with pytest.raises(ProtocolError, match="exceeds") as info:
        decode(_mutated(name, path, value))
    assert info.value.where == where


@pytest.mark.parametrize(
    "name, path, where",
    [
        ("EngineInfo", ("model", "blob"), "EngineInfo.model.blob"),
        ("EngineInfo", ("model", "nested", 0, 1, 1), "EngineInfo.model.nested[0][1][1]"),
        (
            "UpdateWeightsFromIPC",
            ("buffer", "cuda", "handle"),
            "UpdateWeightsFromIPC.buffer.cuda.handle",
        ),
    ],
)
def test_bytes_field_over_the_configured_cap_is_refused_by_name(name, path, where):
    frame = _mutated(name, path, b"\x07" * 100)
    assert decode(frame, max_bytes_field=100) is not None
    with pytest.raises(ProtocolError, match="exceeds the cap of 99") as info:
        decode(frame, max_bytes_field=99)
    assert info.value.where == where


@pytest.mark.parametrize("wrap", [lambda v: [v], lambda v: {"k": v}], ids=["arrays", "maps"])
def test_free_form_nesting_is_bounded_at_14(wrap):
    def nest(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = wrap(value)
        return value

    assert decode(_mutated("EngineInfo", ("model", "deep"), nest(14))).model["deep"] == nest(14)
    with pytest.raises(ProtocolError, match="nested too deep") as info:
        decode(_mutated("EngineInfo", ("model", "deep"), nest(15)))
    assert info.value.where.startswith("EngineInfo.model.deep")


def test_absurdly_deep_frame_is_refused_without_recursion_error():
    head = _frame(["EngineInfo", {"model": {"deep": 0}}])[:-1]  # drop the value 0
    with pytest.raises(ProtocolError):
        decode(head + b"\x91" * 200_000 + b"\x00")  # 200k nested one-element arrays


def test_duplicate_keys_keep_the_last_value():
    # Documented in PROTOCOL.md: senders must not repeat a key; if they do, the last one wins.
    frame = b"\x92\xa5Abort\x82\xaarequest_id\xa1a\xaarequest_id\xa1b"
    assert decode(frame) == p.Abort(request_id="b")


# ---------------------------------------------------------------- no pickle, ever


class _TouchOnUnpickle:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_is_refused_and_never_run(tmp_path, protocol):
    control, target = tmp_path / "control", tmp_path / "target"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(control), protocol=protocol))
    assert control.exists()  # proves this payload runs code when unpickled
    frame = pickle.dumps(_TouchOnUnpickle(target), protocol=protocol)
    with pytest.raises(ProtocolError):
        decode(frame)
    assert not target.exists()


def test_pickled_message_is_refused_as_not_msgpack():
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode(pickle.dumps(SAMPLES["Generate"]))


# ---------------------------------------------------------------- the written protocol


DOC = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"


def _doc_sections() -> dict[str, str]:
    """'### Name' heading -> its text up to the next heading of any level."""
    parts = re.split(r"^##+ +`?([\w ]+?)`?\s*$", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _doc_rows(cls: type) -> dict[str, list[str]]:
    """field -> [type, default, limits, meaning] cells of its row in the class's section."""
    section = _doc_sections().get(cls.__name__)
    assert section is not None, f"docs/PROTOCOL.md has no '### {cls.__name__}' section"
    rows = re.findall(r"^\| `(\w+)` \|(.*)\|\s*$", section, flags=re.M)
    return {name: [c.strip() for c in re.split(r"(?<!\\)\|", rest)] for name, rest in rows}


def _doc_number(text: str) -> float:
    return eval(text.replace("2^", "2**"), {})  # our own doc: "65535", "2^63-1", "0.1"


def _doc_limits(cell: str) -> dict[str, float]:
    """ "1 … 65535, len ≤ 8" style cell -> {"ge": 1, "le": 65535, "max_len": 8}."""
    limits: dict[str, float] = {}
    for part in filter(None, (piece.strip() for piece in cell.split(","))):
        if part.startswith("len ≤ "):
            limits["max_len"] = _doc_number(part[len("len ≤ ") :])
        elif part.startswith("≥ "):
            limits["ge"] = _doc_number(part[2:])
        else:
            low, high = part.split(" … ")
            limits["ge"], limits["le"] = _doc_number(low), _doc_number(high)
    return limits


def _doc_default(cell: str) -> Any:
    if cell == "nil":
        return None
    literal = cell.strip("`")
    return (
        {"true": True, "false": False, "[]": [], "{}": {}}.get(literal)
        if literal in ("true", "false", "[]", "{}")
        else literal[1:-1]
        if literal.startswith('"')
        else _doc_number(literal)
    )


WIRE_TYPES = [
    *p.MESSAGE_TYPES.values(),
    p.SamplingParams,
    p.IpcBuffer,
    p.DeltaInfo,
    p.BucketPlan,
    p.Bucket,
    p.TensorSpec,
    p.UpdateTimings,
    p.WeightSpec,
    p.VersionSpan,
]


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda c: c.__name__)
def test_protocol_doc_lists_every_field(cls):
    assert set(_doc_rows(cls)) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda c: c.__name__)
def test_protocol_doc_limits_match_the_code(cls):
    rows = _doc_rows(cls)
    for f in dataclasses.fields(cls):
        assert _doc_limits(rows[f.name][2]) == dict(f.metadata), f.name


@pytest.mark.parametrize("cls", WIRE_TYPES, ids=lambda c: c.__name__)
def test_protocol_doc_defaults_match_the_code(cls):
    rows = _doc_rows(cls)
    for f in dataclasses.fields(cls):
        cell = rows[f.name][1]
        value = _default(f)
        if cell == "**required**":
            assert f.name in codec._required(cls), f.name
        elif isinstance(value, bytes) or dataclasses.is_dataclass(value):
            assert not cell.startswith("`"), f.name  # said in words: "empty", "defaults"
        else:
            assert f.name not in codec._required(cls), f.name
            assert _doc_default(cell) == value, f.name


def test_protocol_doc_example_frame_decodes():
    block = DOC.read_text().split("35 bytes:")[1].split("```")[1]
    hexes = [
        tok
        for line in block.splitlines()
        for tok in line.split()[:12]
        if re.fullmatch(r"[0-9a-f]{2}", tok)
    ]
    frame = bytes.fromhex("".join(hexes))
    assert len(frame) == 35
    assert decode(frame) == p.Abort(request_id="x1", target_id="r1")


def test_version_spans_run_length_encode_token_versions():
    spans = p.version_spans([3, 3, 4, 4, 4, 3])
    assert [(s.version, s.tokens) for s in spans] == [(3, 2), (4, 3), (3, 1)]
    assert p.token_versions(spans) == [3, 3, 4, 4, 4, 3]
    assert p.version_spans([]) == [] and p.token_versions([]) == []


def test_a_version_span_of_no_tokens_is_refused():
    frame = encode(p.GenerateOutput(version_spans=[p.VersionSpan(version=1, tokens=1)]))
    bad = frame.replace(b"\xa6tokens\x01", b"\xa6tokens\x00")
    with pytest.raises(ProtocolError, match=r"version_spans\[0\]\.tokens"):
        decode(bad)
