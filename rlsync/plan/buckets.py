"""Bucket layout: plan named tensors into aligned buckets, pack them, view them back, fingerprint.

A plan is a plain `BucketPlan` value (see `rlsync.wire.protocol`): computed once from names,
dtypes and shapes, cached while those stay the same, and sent as metadata so the receiver
can validate the whole update before a single byte arrives. Packing copies (and casts) each
tensor into its slot of a flat uint8 buffer; unpacking returns zero-copy views. Nothing here
knows which transport moves the buffer.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from rlsync.wire.protocol import Bucket, BucketPlan, TensorSpec

DEFAULT_ALIGNMENT = 256
DEFAULT_BUCKET_BYTES = 64 << 20
MAX_PLAN_BYTES = 1 << 44  # 16 TiB: anything above is a corrupt plan, not a model

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
for _name in (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


class PlanError(ValueError):
    """A bucket plan that cannot describe a real buffer; the message names the tensor."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}") from None


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype_from_name(dtype).itemsize


def plan_buckets(
    specs: Iterable[tuple[str, str, Sequence[int]]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    alignment: int = DEFAULT_ALIGNMENT,
) -> BucketPlan:
    """Greedy, order-preserving plan: fill a bucket until the next tensor would overflow it.

    A tensor larger than `bucket_bytes` gets a bucket of its own. Each tensor starts at an
    `alignment`-byte offset and each bucket's size is rounded up to `alignment`.
    """
    if bucket_bytes <= 0 or alignment <= 0 or alignment % 8:
        raise PlanError(
            f"bucket_bytes={bucket_bytes} and alignment={alignment} must be >0 (alignment %8)"
        )
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    used = 0
    for name, dtype, shape in specs:
        nbytes = tensor_nbytes(dtype, shape)
        start = align_up(used, alignment)
        if current and start + nbytes > bucket_bytes:
            buckets.append(Bucket(nbytes=_bucket_size(used, alignment), tensors=current))
            current, start = [], 0
        current.append(
            TensorSpec(name=name, dtype=dtype, shape=list(shape), offset=start, nbytes=nbytes)
        )
        used = start + nbytes
    if current:
        buckets.append(Bucket(nbytes=_bucket_size(used, alignment), tensors=current))
    plan = BucketPlan(alignment=alignment, buckets=buckets)
    validate_plan(plan)
    return plan


def plan_in_store(
    specs: Iterable[tuple[str, str, Sequence[int]]],
    offsets: Mapping[str, int],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    solo_bytes: int | None = None,
) -> BucketPlan:
    """A plan whose buckets are contiguous byte ranges of an engine's flat store, so a
    receiver lands each bucket in place and a writer copies each tensor straight to its home.

    Tensors go in store order; a bucket closes before the tensor that would take it past
    `bucket_bytes`; with `solo_bytes`, a tensor at least that large gets a bucket of its own
    (a sender can then send the trainer's tensor as it is, with no packing copy). The plan's
    alignment is the largest power of two up to 256 dividing every
    offset (the q/k/v rows of a fused projection may sit at finer offsets than whole tensors);
    the store pads each fused tensor to 256 bytes, so an aligned bucket end never reaches
    into a tensor of the next bucket (`validate_placement` checks that on the engine).
    """
    items = sorted(specs, key=lambda s: offsets[s[0]])
    alignment = DEFAULT_ALIGNMENT
    while alignment > 8 and any(offsets[n] % alignment for n, _, _ in items):
        alignment //= 2
    if any(offsets[n] % alignment for n, _, _ in items):
        raise PlanError("store offsets are not 8-byte aligned; the plan cannot follow the store")
    buckets: list[Bucket] = []
    current: list[TensorSpec] = []
    start = end = 0
    alone = False
    for name, dtype, shape in items:
        offset, nbytes = offsets[name], tensor_nbytes(dtype, shape)
        solo = solo_bytes is not None and nbytes >= solo_bytes
        if current and (solo or alone or offset + nbytes - start > bucket_bytes):
            buckets.append(_store_bucket(current, start, end, alignment))
            current = []
        alone = solo
        if not current:
            start = offset
        current.append(
            TensorSpec(
                name=name, dtype=dtype, shape=list(shape), offset=offset - start, nbytes=nbytes
            )
        )
        end = offset + nbytes
    if current:
        buckets.append(_store_bucket(current, start, end, alignment))
    plan = BucketPlan(alignment=alignment, buckets=buckets)
    validate_plan(plan)
    return plan


def _store_bucket(tensors: list[TensorSpec], start: int, end: int, alignment: int) -> Bucket:
    return Bucket(nbytes=_bucket_size(end - start, alignment), tensors=tensors, store_offset=start)


def in_store(plan: BucketPlan) -> bool:
    """Whether the plan's buckets are ranges of the engine's store (see `plan_in_store`)."""
    return bool(plan.buckets) and plan.buckets[0].store_offset is not None


def validate_placement(
    plan: BucketPlan, layout: Mapping[str, tuple[int, int]], store_bytes: int
) -> None:
    """Check an in-store plan against the engine's layout (name -> byte offset, nbytes):
    every tensor lands exactly on its own bytes, and no bucket's range reaches a byte of a
    tensor that bucket does not carry. Raises PlanError naming the bucket or tensor."""
    spans = sorted((off, off + n, name) for name, (off, n) in layout.items())
    starts = [s[0] for s in spans]
    for b, bucket in enumerate(plan.buckets):
        where = f"bucket {b}"
        if bucket.store_offset is None:
            raise PlanError(f"{where}: no store_offset in a plan that follows the store")
        lo, hi = bucket.store_offset, bucket.store_offset + bucket.nbytes
        if hi > store_bytes:
            raise PlanError(f"{where}: ends at byte {hi}, past the store's {store_bytes} bytes")
        carried = set()
        for spec in bucket.tensors:
            want = layout.get(spec.name)
            got = (lo + spec.offset, spec.nbytes)
            if want != got:
                raise PlanError(
                    f"{where} tensor {spec.name!r}: would write bytes [{got[0]}, "
                    f"{got[0] + got[1]}) of the store; the tensor is at {want}"
                )
            carried.add(spec.name)
        first = max(bisect.bisect_right(starts, lo) - 1, 0)
        for off, end, name in spans[first:]:
            if off >= hi:
                break
            if end > lo and name not in carried:
                raise PlanError(f"{where}: range [{lo}, {hi}) overlaps tensor {name!r}")


def _bucket_size(used: int, alignment: int) -> int:
    # at least one alignment unit: a bucket holding only empty tensors is still a real buffer
    return max(align_up(used, alignment), alignment)


def padded_bytes(sizes: Iterable[int], alignment: int) -> int:
    """The most bytes tensors of these sizes may span in one bucket or store: their bytes
    plus one padding unit each (the plan's alignment, or the 256 bytes an engine's store pads
    every fused tensor to, whichever is larger), and at least one alignment unit.

    Why: a receiver allocates (or addresses) what a plan says; without a bound tied to the
    tensors, a buggy pusher's bucket of a few TiB makes the engine die allocating it."""
    unit = max(alignment, DEFAULT_ALIGNMENT)
    total = count = 0
    for n in sizes:
        total, count = total + n, count + 1
    return max(total + unit * count, alignment)


def validate_plan(plan: BucketPlan, max_bytes: int | None = None) -> int:
    """Check a plan describes real, disjoint, aligned slots, no bucket larger than its own
    tensors need (`padded_bytes`), and (`max_bytes`: the receiver's store) no more bytes in
    all than the receiver holds; return its total bytes. PlanError names the bucket."""
    if plan.alignment <= 0 or plan.alignment % 8:
        raise PlanError(f"alignment {plan.alignment} must be a positive multiple of 8")
    limit = MAX_PLAN_BYTES if max_bytes is None else min(max_bytes, MAX_PLAN_BYTES)
    total, seen = 0, set()
    for b, bucket in enumerate(plan.buckets):
        if bucket.nbytes <= 0 or bucket.nbytes % plan.alignment:
            raise PlanError(
                f"bucket {b}: nbytes {bucket.nbytes} not a positive multiple of {plan.alignment}"
            )
        end = 0
        for spec in bucket.tensors:
            _validate_spec(spec, bucket, b, plan.alignment, end)
            if spec.name in seen:
                raise PlanError(f"{spec.name}: appears twice in the plan")
            seen.add(spec.name)
            end = spec.offset + spec.nbytes
        _check_bucket_size(bucket, b, plan.alignment)
        total += bucket.nbytes
        if total > limit:
            whose = "the plan's limit" if max_bytes is None else "the receiver's store"
            raise PlanError(f"bucket {b}: plan total {total} bytes exceeds {whose} ({limit} bytes)")
    return total


def _check_bucket_size(bucket: Bucket, b: int, alignment: int) -> None:
    """A bucket spans at most its tensors' bytes plus padding: nothing larger is allocated."""
    tensor_bytes = sum(s.nbytes for s in bucket.tensors)
    most = padded_bytes((s.nbytes for s in bucket.tensors), alignment)
    if bucket.nbytes > most:
        raise PlanError(
            f"bucket {b}: nbytes {bucket.nbytes} exceeds its {len(bucket.tensors)} tensors' "
            f"{tensor_bytes} bytes plus alignment padding (at most {most})"
        )


def _validate_spec(spec: TensorSpec, bucket: Bucket, b: int, alignment: int, prev_end: int) -> None:
    where = f"bucket {b} tensor {spec.name!r}"
    if any((not isinstance(d, int)) or d < 0 for d in spec.shape):
        raise PlanError(f"{where}: negative or non-int dim in shape {spec.shape}")
    try:
        expected = tensor_nbytes(spec.dtype, spec.shape)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None
    if expected > MAX_PLAN_BYTES:
        raise PlanError(f"{where}: {expected} bytes exceeds {MAX_PLAN_BYTES}")
    if spec.nbytes != expected:
        raise PlanError(f"{where}: nbytes {spec.nbytes} != {expected} for {spec.dtype}{spec.shape}")
    if spec.offset % alignment:
        raise PlanError(f"{where}: offset {spec.offset} not aligned to {alignment}")
    if spec.offset < prev_end:
        raise PlanError(
            f"{where}: offset {spec.offset} overlaps the previous tensor (ends {prev_end})"
        )
    if spec.offset + spec.nbytes > bucket.nbytes:
        raise PlanError(
            f"{where}: ends at {spec.offset + spec.nbytes}, past bucket size {bucket.nbytes}"
        )


def plan_total_bytes(plan: BucketPlan) -> int:
    return sum(b.nbytes for b in plan.buckets)


def pack_bucket(bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
    """Copy each tensor of `bucket` into `out` (uint8, >= bucket.nbytes), casting to the plan's
    dtype; padding is zeroed so equal weights always give equal bytes and fingerprints."""
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < bucket.nbytes:
        raise PlanError(f"pack target must be a 1-D uint8 buffer of >= {bucket.nbytes} bytes")
    end = 0
    for spec in bucket.tensors:
        src = tensors[spec.name]
        if tuple(src.shape) != tuple(spec.shape):  # copy_ would broadcast a wrong shape
            raise PlanError(f"{spec.name}: shape {tuple(src.shape)} != planned {tuple(spec.shape)}")
        if spec.offset > end:
            out[end : spec.offset].zero_()
        _view(out, spec).copy_(src)
        end = spec.offset + spec.nbytes
    if bucket.nbytes > end:
        out[end : bucket.nbytes].zero_()


def bucket_views(bucket: Bucket, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy (name, tensor) views of a packed bucket; they share storage with `buf`."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < bucket.nbytes:
        raise PlanError(f"bucket buffer must be a 1-D uint8 tensor of >= {bucket.nbytes} bytes")
    return [(spec.name, _view(buf, spec)) for spec in bucket.tensors]


def _view(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    raw = buf[spec.offset : spec.offset + spec.nbytes]
    return raw.view(dtype_from_name(spec.dtype)).view(spec.shape)


# ---------------------------------------------------------------- fingerprints

_MIX_POS = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: spreads word positions
_MIX_VAL = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64, odd: keeps every bit flip visible
_CHUNK_WORDS = 1 << 21
_pos_cache: dict[tuple[torch.device, int], torch.Tensor] = {}


def fingerprint(buf: torch.Tensor) -> torch.Tensor:
    """A 64-bit fingerprint of a byte buffer, as a 0-dim int64 tensor on the buffer's device.

    n + sum_i ((w_i ^ (i * A)) * B) mod 2^64 over the little-endian 8-byte words w_i of the
    buffer zero-padded to a multiple of 8, where n is the unpadded byte length (so trailing
    zero bytes count). B is odd, so flipping any single bit changes the sum; the position
    term makes swapped words visible. Runs as torch ops on the buffer's own device (no host
    round trip on a GPU), in bounded chunks.
    """
    flat = buf.reshape(-1).view(torch.uint8)
    nbytes = flat.numel()
    if nbytes % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - nbytes % 8)])
    elif flat.storage_offset() % 8:
        flat = flat.clone()  # an int64 view needs an 8-byte-aligned start
    words = flat.view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        pos = _positions(words.device, chunk.numel()) + _wrap64(start * _MIX_POS)
        total += ((chunk ^ pos) * _MIX_VAL).sum()
    return total + nbytes


def _wrap64(n: int) -> int:
    return (n + (1 << 63)) % (1 << 64) - (1 << 63)


def fingerprint_int(buf: torch.Tensor) -> int:
    return int(fingerprint(buf).item())


def tensor_fingerprint(t: torch.Tensor) -> int:
    """Fingerprint of a tensor's logical bytes (contiguous copy if strided)."""
    return fingerprint_int(t.detach().contiguous().reshape(-1).view(torch.uint8))


def _positions(device: torch.device, n: int) -> torch.Tensor:
    """i * A for i < n (n <= _CHUNK_WORDS): slices of one cached chunk per device, so the
    cache stays at _CHUNK_WORDS words however many buffer sizes are fingerprinted."""
    key = (device, _CHUNK_WORDS)
    if key not in _pos_cache:
        _pos_cache[key] = torch.arange(_CHUNK_WORDS, dtype=torch.int64, device=device) * _MIX_POS
    return _pos_cache[key][:n]
