"""The pusher's half of `rlsync.plan.delta`: the base, and bucket payloads encoded against it.

`DeltaEncoder` keeps the packed bytes of the last version every engine acknowledged (one
host buffer per bucket) and encodes bucket after bucket of the next version: a sample of
every 1021st unit says whether the bucket is sparse enough (`max_changed`); a sparse one is
compared whole (8-byte words first, then the units inside the changed words) and sent as
positions and new values, a dense one is packed straight into the base and sent whole. The
base is updated as it goes. Nothing here knows a transport, an engine or a trainer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rlsync.plan.buckets import align_up, dtype_from_name, fingerprint_int, pack_bucket
from rlsync.plan.delta import (
    FLAG_BODY_CHECK,
    INT_TYPES,
    RAW,
    SPARSE,
    Header,
    Payload,
    header_tensor,
    sparse_body_bytes,
    unit_width,
    units_of,
)
from rlsync.wire.protocol import Bucket, BucketPlan, TensorSpec

SAMPLE_STRIDE = 1021
"""Every 1021st unit (at least ~512 per bucket) is compared first: the estimate sends a dense
bucket whole at once (so a 100% change costs no full compare) and picks how to find changes."""
TWO_LEVEL_BELOW = 0.03
"""Below this sampled fraction, find changes on 8-byte words first (`changes`)."""


@dataclass(kw_only=True)
class EncodeStats:
    """What one push's encoding did (the bench and the push report read it)."""

    buckets: int = 0
    raw_buckets: int = 0
    units: int = 0
    changed_units: float = 0.0
    """Units that differ from the base: counted exactly in SPARSE buckets, estimated from
    the sample in buckets sent whole (all of them when there is no base)."""
    raw_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0

    @property
    def changed_fraction(self) -> float:
        return self.changed_units / self.units if self.units else 0.0


class DeltaEncoder:
    """The pusher's base for one plan, and the encoding of new versions against it.

    `encode` updates the base to the new bytes as it goes (so a push that fails leaves the
    base ahead of some engine: the caller must then drop it with `invalidate`).
    """

    def __init__(self, plan: BucketPlan, *, checksum_raw: bool = False, max_changed: float = 0.02):
        """`max_changed`: a bucket whose sampled share of changed units is above this is
        sent whole (RAW), without a full compare (`sync.delta_max_changed`)."""
        self.plan = plan
        self.checksum_raw = checksum_raw
        self.max_changed = max_changed
        self.base = [torch.zeros(b.nbytes, dtype=torch.uint8) for b in plan.buckets]
        self.version: int | None = None
        """The version the base holds, once a push of it reached every engine."""
        self.stats = EncodeStats()

    def invalidate(self) -> None:
        self.version = None

    def begin(self) -> None:
        """Start a push: reset the per-push stats."""
        self.stats = EncodeStats()

    def encode(self, g: int, tensors: Mapping[str, torch.Tensor], *, full: bool) -> Payload:
        """Bucket `g` of the new version, against the base (or RAW when `full` or dense);
        afterwards the base holds the new bytes of bucket `g`."""
        t0 = time.perf_counter()
        bucket, base = self.plan.buckets[g], self.base[g]
        width = unit_width(bucket)
        payload, units = None, bucket.nbytes // width
        changed = float(units)  # no base: all of it counts as changed
        if not full and self.version is not None:
            sampled = _sampled_fraction(bucket, base, tensors, width)
            changed = sampled * units  # a RAW bucket's share is the sample's estimate
            payload = _encode_sparse(g, bucket, base, tensors, width, self.max_changed, sampled)
        if payload is None:
            payload = self._encode_raw(g, bucket, base, tensors, width)
        else:
            changed = payload.changed
        s = self.stats
        s.buckets += 1
        s.raw_buckets += payload.kind == RAW
        s.units += units
        s.changed_units += changed
        s.raw_bytes += bucket.nbytes
        s.wire_bytes += payload.nbytes
        s.seconds += time.perf_counter() - t0
        return payload

    def _encode_raw(
        self, g: int, bucket: Bucket, base: torch.Tensor, tensors: Mapping, width: int
    ) -> Payload:
        pack_bucket(bucket, tensors, base)
        body = base[: bucket.nbytes]
        header = Header(
            kind=RAW,
            width=width,
            index_bytes=4,
            flags=FLAG_BODY_CHECK if self.checksum_raw else 0,
            bucket=g,
            count=0,
            body_nbytes=bucket.nbytes,
            bucket_nbytes=bucket.nbytes,
            base_check=0,
            body_check=fingerprint_int(body) if self.checksum_raw else 0,
        )
        return Payload(
            header=header_tensor(header), body=body, kind=RAW, changed=bucket.nbytes // width
        )


def _source(spec: TensorSpec, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    src = tensors[spec.name]
    if tuple(src.shape) != tuple(spec.shape):
        raise ValueError(f"{spec.name}: shape {tuple(src.shape)} != planned {tuple(spec.shape)}")
    return src


def _as_planned(src: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """`src` in the plan's dtype, in host memory (a copy only when it is not already)."""
    dtype = dtype_from_name(spec.dtype)
    if src.dtype != dtype or src.device.type != "cpu":
        src = src.to("cpu", dtype)
    return src


def _new_units(spec: TensorSpec, tensors: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    return units_of(_as_planned(_source(spec, tensors), spec), width)


def _base_units(base: torch.Tensor, spec: TensorSpec, width: int) -> torch.Tensor:
    return base[spec.offset : spec.offset + spec.nbytes].view(INT_TYPES[width])


def changes(
    new: torch.Tensor, base: torch.Tensor, two_level: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, new values, base values) where `new` and `base` (same-shape 1-D ints)
    differ; positions ascending, int64.

    `two_level`, for sparse changes: compare whole 8-byte words (a mask 2-8x smaller than
    one per unit), find the changed words 8 at a time (`_sparse_nonzero`), gather just those
    words, then see which units inside them changed."""
    per_word = 8 // new.element_size()
    full = new.numel() // (8 * per_word) * (8 * per_word)
    aligned = new.data_ptr() % 8 == 0 and base.data_ptr() % 8 == 0
    if not two_level or full == 0 or not aligned:
        idx = torch.ne(new, base).nonzero().squeeze(1)
        return idx, new.index_select(0, idx), base.index_select(0, idx)
    new64, base64 = new[:full].view(torch.int64), base[:full].view(torch.int64)
    words = _sparse_nonzero(torch.ne(new64, base64))
    sub_new = new64.index_select(0, words).view(new.dtype)  # 1-D gathers of whole words
    sub_base = base64.index_select(0, words).view(new.dtype)
    inside = torch.ne(sub_new, sub_base).nonzero().squeeze(1)
    idx = words.index_select(0, inside // per_word) * per_word + inside % per_word
    found = (idx, sub_new.index_select(0, inside), sub_base.index_select(0, inside))
    if full == new.numel():
        return found
    tail = torch.ne(new[full:], base[full:]).nonzero().squeeze(1)
    extra = (tail + full, new[full:].index_select(0, tail), base[full:].index_select(0, tail))
    return tuple(torch.cat([a, b]) for a, b in zip(found, extra, strict=True))  # type: ignore[return-value]


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """nonzero() of a bool mask whose length is a multiple of 8, mostly False: the 8-byte
    groups with any True first (one int64 each), then the Trues inside them."""
    groups = mask.view(torch.int64).nonzero().squeeze(1)
    rows, cols = mask.view(-1, 8).index_select(0, groups).nonzero(as_tuple=True)
    return groups.index_select(0, rows) * 8 + cols


def _sampled_fraction(bucket: Bucket, base: torch.Tensor, tensors: Mapping, width: int) -> float:
    """The changed share of every k-th element (at least ~512 samples per bucket)."""
    stride = max(1, min(SAMPLE_STRIDE, bucket.nbytes // width // 512))
    hits = total = 0
    for spec in bucket.tensors:
        # sample first, cast after: an fp32 trainer pushing to bf16 engines casts 1/stride
        sample = _as_planned(_source(spec, tensors).reshape(-1)[::stride], spec)
        item = sample.element_size()
        old = base[spec.offset : spec.offset + spec.nbytes].view(INT_TYPES[item])[::stride]
        hits += int(torch.ne(units_of(sample, item), old).sum())
        total += sample.numel()
    return hits / total if total else 0.0


def _encode_sparse(
    g: int,
    bucket: Bucket,
    base: torch.Tensor,
    tensors: Mapping,
    width: int,
    max_changed: float,
    sampled: float,
) -> Payload | None:
    """The SPARSE payload of bucket `g`, or None when the bucket should go whole: its
    `sampled` share of changed units is above `max_changed`, or SPARSE would not be smaller
    than RAW (then the base may be partly updated: the RAW encoding repacks the bucket)."""
    units = bucket.nbytes // width
    index_bytes = 4 if units < (1 << 31) else 8
    budget = units * width  # a RAW body's size: SPARSE must stay below it
    if sampled > max_changed or sampled * units * (width + index_bytes) >= 0.8 * budget:
        return None
    idx_parts, new_parts, old_parts, count = [], [], [], 0
    for spec in bucket.tensors:
        new, old = _new_units(spec, tensors, width), _base_units(base, spec, width)
        idx, values, was = changes(new, old, sampled < TWO_LEVEL_BELOW)
        if idx.numel() == 0:
            continue
        count += idx.numel()
        if sparse_body_bytes(count, width, index_bytes) >= budget:
            return None
        old_parts.append(was)
        old.scatter_(0, idx, values)  # the base now holds the new bytes of this tensor
        new_parts.append(values)
        idx_parts.append(idx + spec.offset // width)
    return _sparse_payload(g, bucket, width, index_bytes, idx_parts, new_parts, old_parts)


def _sparse_payload(
    g: int,
    bucket: Bucket,
    width: int,
    index_bytes: int,
    idx_parts: list[torch.Tensor],
    new_parts: list[torch.Tensor],
    old_parts: list[torch.Tensor],
) -> Payload:
    count = sum(p.numel() for p in idx_parts)
    body = torch.zeros(sparse_body_bytes(count, width, index_bytes), dtype=torch.uint8)
    index_end = count * index_bytes
    values_at = align_up(index_end, 8)
    if count:
        idx = torch.cat(idx_parts).to(INT_TYPES[index_bytes])
        body[:index_end].copy_(idx.view(torch.uint8))
        body[values_at:].copy_(torch.cat(new_parts).view(torch.uint8))
    old = torch.cat(old_parts) if old_parts else torch.empty(0, dtype=INT_TYPES[width])
    header = Header(
        kind=SPARSE,
        width=width,
        index_bytes=index_bytes,
        flags=FLAG_BODY_CHECK,
        bucket=g,
        count=count,
        body_nbytes=body.numel(),
        bucket_nbytes=bucket.nbytes,
        base_check=fingerprint_int(old.view(torch.uint8)),
        body_check=fingerprint_int(body),
    )
    return Payload(header=header_tensor(header), body=body, kind=SPARSE, changed=count)
