"""Bucket layout: greedy aligned plans, byte-exact pack/unpack, plan validation, fingerprints."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from rlsync.plan import buckets as B
from rlsync.plan.buckets import PlanError, bucket_views, fingerprint, pack_bucket, plan_buckets
from rlsync.wire.codec import decode, encode
from rlsync.wire.protocol import Bucket, BucketPlan, TensorSpec, UpdateWeightsFromDistributed

FLOAT8 = [getattr(torch, n) for n in dir(torch) if n.startswith("float8_")]
DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    *FLOAT8,
]
SHAPES = [(3, 5), (7,), (), (0,), (2, 0, 3), (1, 1, 1, 1)]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and all) so byte-exactness is tested, not value equality."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _pack_all(
    plan: BucketPlan, tensors: dict[str, torch.Tensor], slack: int = 0
) -> list[torch.Tensor]:
    """Pack every bucket into a buffer prefilled with 0xFF (so unzeroed padding shows)."""
    bufs = []
    for bucket in plan.buckets:
        buf = torch.full((bucket.nbytes + slack,), 0xFF, dtype=torch.uint8)
        pack_bucket(bucket, tensors, buf)
        bufs.append(buf)
    return bufs


def _specs(
    named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of each tensor, as plan_buckets takes them."""
    return [(n, B.dtype_name(dtype or t.dtype), tuple(t.shape)) for n, t in named]


def _round_trip(tensors: dict[str, torch.Tensor], **plan_kw) -> dict[str, torch.Tensor]:
    plan = plan_buckets(_specs(tensors.items()), **plan_kw)
    out = {}
    for bucket, buf in zip(plan.buckets, _pack_all(plan, tensors), strict=True):
        out.update(bucket_views(bucket, buf))
    return out


# ---------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_and_views_are_byte_exact_for_every_dtype(dtype):
    tensors = {f"w{i}": _random(dtype, s, seed=i) for i, s in enumerate(SHAPES)}
    views = _round_trip(tensors, bucket_bytes=128, alignment=64)
    assert list(views) == list(tensors)
    for name, src in tensors.items():
        assert views[name].dtype == dtype and views[name].shape == src.shape
        assert _bytes(views[name]) == _bytes(src), name


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.t(),
        lambda x: x[:, ::2],
        lambda x: x[1:3, 2:5],
        lambda x: x[0, 0],
        lambda x: x[:, :0],
        lambda x: x[2:3].expand(4, 8),
        lambda x: x.t()[::3],
    ],
    ids=["transposed", "strided", "sliced", "0-dim", "empty", "expanded", "transposed-strided"],
)
def test_non_contiguous_inputs_pack_their_logical_values(make):
    src = make(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    assert not src.is_contiguous() or src.dim() == 0 or src.numel() == 0
    views = _round_trip({"w": src})
    assert _bytes(views["w"]) == _bytes(src)
    assert torch.equal(views["w"], src)


def test_views_share_storage_with_the_buffer():
    tensors = {"a": _random(torch.float16, (5, 3)), "b": _random(torch.int64, (4,))}
    plan = plan_buckets(_specs(tensors.items()))
    (buf,) = _pack_all(plan, tensors)
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for name, view in bucket_views(plan.buckets[0], buf):
        assert start <= view.data_ptr() and view.data_ptr() + view.numel() * view.itemsize <= end
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr(), name
    buf.zero_()
    assert all(not v.any() for _, v in bucket_views(plan.buckets[0], buf))


def test_padding_is_zeroed_and_bytes_past_the_bucket_untouched():
    tensors = {
        "a": torch.full((3,), 0xAB, dtype=torch.uint8),
        "b": torch.full((5,), 0xCD, dtype=torch.uint8),
    }
    plan = plan_buckets(_specs(tensors.items()), alignment=16)
    (buf,) = _pack_all(plan, tensors, slack=8)
    expected = [0xAB] * 3 + [0] * 13 + [0xCD] * 5 + [0] * 11 + [0xFF] * 8
    assert plan.buckets[0].nbytes == 32
    assert buf.tolist() == expected


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_pack_casts_to_the_plan_dtype_like_to(target):
    src = torch.randn(33, 7, generator=torch.Generator().manual_seed(3)) * 10
    plan = plan_buckets(_specs([("w", src)], dtype=target))
    assert plan.buckets[0].tensors[0].dtype == B.dtype_name(target)
    (buf,) = _pack_all(plan, {"w": src})
    ((_, view),) = bucket_views(plan.buckets[0], buf)
    assert view.dtype == target
    assert _bytes(view) == _bytes(src.to(target))


@pytest.mark.parametrize("shape", [(4,), (8,), (2, 1), (1, 4)])
def test_pack_refuses_a_source_of_the_wrong_shape(shape):
    # copy_ would broadcast (4,) or (1, 4) into (2, 4) and silently write wrong weights.
    plan = plan_buckets([("model.w", "float32", (2, 4))])
    buf = torch.empty(plan.buckets[0].nbytes, dtype=torch.uint8)
    with pytest.raises(PlanError, match="model.w"):
        pack_bucket(plan.buckets[0], {"model.w": torch.ones(shape)}, buf)


@pytest.mark.parametrize(
    "buf",
    [
        torch.empty(255, dtype=torch.uint8),
        torch.empty(256, dtype=torch.int8),
        torch.empty(16, 16, dtype=torch.uint8),
    ],
    ids=["short", "int8", "2-d"],
)
def test_pack_and_views_refuse_a_bad_buffer(buf):
    plan = plan_buckets([("w", "float32", (4,))])
    with pytest.raises(PlanError):
        pack_bucket(plan.buckets[0], {"w": torch.ones(4)}, buf)
    with pytest.raises(PlanError):
        bucket_views(plan.buckets[0], buf)


# ---------------------------------------------------------------- planning


def _layout(plan: BucketPlan) -> list[tuple[int, list[tuple[str, int]]]]:
    return [(b.nbytes, [(t.name, t.offset) for t in b.tensors]) for b in plan.buckets]


def test_greedy_layout_is_exact():
    specs = [
        ("a", "uint8", (100,)),
        ("b", "uint8", (300,)),
        ("c", "uint8", (200,)),
        ("d", "uint8", (600,)),
        ("e", "uint8", (10, 10)),
    ]
    plan = plan_buckets(specs, bucket_bytes=1024, alignment=256)
    assert _layout(plan) == [
        (1024, [("a", 0), ("b", 256), ("c", 768)]),
        (1024, [("d", 0), ("e", 768)]),
    ]


def test_a_tensor_larger_than_a_bucket_gets_its_own():
    specs = [("small", "float32", (10,)), ("big", "float32", (1000,)), ("tail", "float32", (10,))]
    plan = plan_buckets(specs, bucket_bytes=1024, alignment=256)
    assert _layout(plan) == [(256, [("small", 0)]), (4096, [("big", 0)]), (256, [("tail", 0)])]


def test_empty_tensor_before_an_oversized_one_gives_no_empty_bucket():
    specs = [("empty", "float32", (0,)), ("big", "float32", (1000,))]
    plan = plan_buckets(specs, bucket_bytes=512, alignment=256)
    assert [t.name for b in plan.buckets for t in b.tensors] == ["empty", "big"]
    assert all(b.nbytes > 0 for b in plan.buckets)


@pytest.mark.parametrize("alignment", [8, 64, 256, 4096])
def test_offsets_and_bucket_sizes_are_aligned_and_order_is_kept(alignment):
    specs = [
        (f"t{i}", str(d).removeprefix("torch."), (i % 5 + 1, 3)) for i, d in enumerate(DTYPES * 3)
    ]
    plan = plan_buckets(specs, bucket_bytes=2048, alignment=alignment)
    assert [t.name for b in plan.buckets for t in b.tensors] == [s[0] for s in specs]
    for bucket in plan.buckets:
        assert bucket.nbytes % alignment == 0
        assert all(t.offset % alignment == 0 for t in bucket.tensors)
    assert B.validate_plan(plan) == sum(b.nbytes for b in plan.buckets)


def test_plan_survives_the_wire_and_still_validates():
    specs = _specs([("a", torch.zeros(3, 4, dtype=torch.bfloat16)), ("b", torch.zeros(()))])
    plan = plan_buckets(specs, alignment=64)
    back = decode(encode(UpdateWeightsFromDistributed(plan=plan))).plan
    assert back == plan and B.validate_plan(back) == 128


@pytest.mark.parametrize("kw", [{"bucket_bytes": 0}, {"alignment": 0}, {"alignment": 12}])
def test_plan_buckets_refuses_bad_arguments(kw):
    with pytest.raises(PlanError):
        plan_buckets([("w", "float32", (4,))], **kw)


def _plan(*tensors: TensorSpec, nbytes: int = 512, alignment: int = 256) -> BucketPlan:
    return BucketPlan(alignment=alignment, buckets=[Bucket(nbytes=nbytes, tensors=list(tensors))])


def _spec(
    name: str = "w", dtype: str = "float32", shape=(4,), offset: int = 0, nbytes: int | None = None
):
    nbytes = B.tensor_nbytes(dtype, shape) if nbytes is None and dtype in B._DTYPES else nbytes
    return TensorSpec(name=name, dtype=dtype, shape=list(shape), offset=offset, nbytes=nbytes or 0)


BAD_PLANS = {
    "negative dim": (
        _plan(_spec("model.w", shape=(4,)), _spec("neg", shape=(-2, 4), offset=256, nbytes=0)),
        "'neg'.*negative",
    ),
    "misaligned offset": (_plan(_spec(offset=8)), "'w'.*not aligned"),
    "overlap": (
        _plan(_spec("a", shape=(100,)), _spec("b", offset=256), nbytes=512),
        "'b'.*overlaps",
    ),
    "overlap same offset": (_plan(_spec("a"), _spec("b")), "'b'.*overlaps"),
    "nbytes mismatch": (_plan(_spec(nbytes=15)), "'w'.*nbytes 15 != 16"),
    "past bucket end": (_plan(_spec(shape=(65,), offset=256)), "'w'.*past bucket size 512"),
    "duplicate names": (
        BucketPlan(
            alignment=256,
            buckets=[
                Bucket(nbytes=256, tensors=[_spec("w")]),
                Bucket(nbytes=256, tensors=[_spec("w")]),
            ],
        ),
        "w: appears twice",
    ),
    "unknown dtype": (_plan(_spec(dtype="float7", nbytes=4)), "'w'.*unknown dtype 'float7'"),
    "bucket not aligned": (_plan(_spec(), nbytes=300), "bucket 0.*300"),
    "empty bucket": (_plan(nbytes=0), "bucket 0"),
    "alignment not a multiple of 8": (_plan(_spec(), alignment=12, nbytes=12 * 40), "alignment 12"),
    "huge tensor": (
        _plan(_spec("huge", "int8", (1 << 40, 1 << 10)), nbytes=1 << 50),
        "'huge'.*exceeds",
    ),
    "bucket past its tensors plus padding": (
        _plan(_spec(), _spec("b", offset=256), nbytes=1024),
        r"bucket 0: nbytes 1024 exceeds its 2 tensors' 32 bytes plus alignment padding",
    ),
    "huge plan": (BucketPlan(alignment=256, buckets=[Bucket(nbytes=1 << 43)] * 3), "exceeds"),
}


@pytest.mark.parametrize("plan, match", BAD_PLANS.values(), ids=BAD_PLANS.keys())
def test_impossible_plans_are_refused_by_name(plan, match):
    with pytest.raises(PlanError, match=match):
        B.validate_plan(plan)


def test_every_float8_dtype_has_a_wire_name():
    for dtype in FLOAT8:
        assert B.dtype_from_name(B.dtype_name(dtype)) is dtype


# ---------------------------------------------------------------- fingerprints

_A, _B, _M = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 1 << 64


def _reference(data: bytes) -> int:
    """docs/PROTOCOL.md's definition, in plain integers."""
    padded = data + bytes(-len(data) % 8)
    total = len(data)
    for i in range(len(padded) // 8):
        w = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        total += ((w ^ (i * _A % _M)) * _B) % _M
    total %= _M
    return total - _M if total >= 1 << 63 else total


def _u8(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 9, 13, 16, 255, 256, 1001])
def test_fingerprint_matches_the_documented_definition(n):
    data = bytes(
        torch.randint(
            0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8
        ).tolist()
    )
    fp = fingerprint(_u8(data))
    assert fp.dtype == torch.int64 and fp.dim() == 0
    assert int(fp) == _reference(data)


def test_trailing_zero_bytes_change_the_fingerprint():
    values = {B.fingerprint_int(_u8(b"\x01" + bytes(k))) for k in range(9)}
    assert len(values) == 9


def test_equal_bytes_give_equal_fingerprints():
    a = _random(torch.bfloat16, (17, 3))
    assert (
        B.tensor_fingerprint(a)
        == B.tensor_fingerprint(a.clone())
        == B.fingerprint_int(a.view(torch.uint8))
    )


def test_every_single_bit_flip_changes_the_fingerprint():
    buf = _random(torch.uint8, (256,), seed=7)
    base = B.fingerprint_int(buf)
    flips = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
    for i in range(buf.numel()):
        for bit in flips:
            flipped = buf.clone()
            flipped[i] ^= bit
            assert B.fingerprint_int(flipped) != base, (i, int(bit))


def test_swapping_two_words_changes_the_fingerprint():
    words = torch.arange(1, 33, dtype=torch.int64) * 0x0101010101
    base = B.fingerprint_int(words.view(torch.uint8))
    for i in range(32):
        for j in range(i + 1, 32):
            swapped = words.clone()
            swapped[[i, j]] = swapped[[j, i]]
            assert B.fingerprint_int(swapped.view(torch.uint8)) != base, (i, j)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
@pytest.mark.parametrize("nbytes", [8, 24, 200, 803])
def test_chunk_boundaries_do_not_change_the_fingerprint(monkeypatch, chunk, nbytes):
    buf = _random(torch.uint8, (nbytes,), seed=nbytes)
    whole = B.fingerprint_int(buf)
    monkeypatch.setattr(B, "_CHUNK_WORDS", chunk)
    monkeypatch.setattr(B, "_pos_cache", {})
    assert B.fingerprint_int(buf) == whole


def test_position_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(B, "_CHUNK_WORDS", 64)
    monkeypatch.setattr(B, "_pos_cache", {})
    for n in range(1, 300):
        B.fingerprint_int(torch.ones(n * 8, dtype=torch.uint8))
    assert sum(t.numel() for t in B._pos_cache.values()) <= 64


@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_fingerprint_of_a_view_at_any_byte_offset(offset):
    # e.g. one head's slice of a fused bf16 qkv weight starts at an odd 2-byte offset
    base = _random(torch.uint8, (64,), seed=offset)
    view = base[offset : offset + 24]
    assert (
        B.tensor_fingerprint(view) == B.tensor_fingerprint(view.clone()) == _reference(_bytes(view))
    )


def test_tensor_fingerprint_reads_logical_bytes_of_strided_tensors():
    x = _random(torch.float32, (5, 6))
    assert B.tensor_fingerprint(x.t()) == B.tensor_fingerprint(x.t().contiguous())
    assert B.tensor_fingerprint(x.t()) != B.tensor_fingerprint(x)


def _doc_vectors() -> list[tuple[bytes, int]]:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md").read_text()
    section = doc.split("## Fingerprints")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (empty|`[0-9a-f ]+`) \| `(-?\d+)` \|$", section, flags=re.M)
    return [(b"" if raw == "empty" else bytes.fromhex(raw.strip("`")), int(fp)) for raw, fp in rows]


def test_documented_test_vectors():
    vectors = _doc_vectors()
    assert len(vectors) >= 4
    for data, expected in vectors:
        assert B.fingerprint_int(_u8(data)) == expected == _reference(data), data.hex()
