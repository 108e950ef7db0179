"""Lossless delta encoding of buckets: send only the units that changed since a base version.

The pusher keeps the packed bytes of the last version every engine acknowledged (the
*base*, one host buffer per bucket) and encodes each bucket of the next version against it;
an engine that holds exactly the base applies the payload to its store. Two kinds of
payload, chosen per bucket by which is smaller:

    SPARSE: the positions of the changed units (ascending) and their new values
    RAW:    the whole bucket (a dense change, or a push with no base)

A *unit* is `width` bytes (the smallest itemsize in the bucket: 4 for fp32, 2 for bf16), so
a changed bf16 value costs its 2 bytes plus its index. Wire format (docs/PROTOCOL.md, "Delta
payloads"): a 64-byte header, then the body.

    header (little-endian): magic b"RLD1" | format u16 | kind u8 | width u8 | index_bytes u8
        | flags u8 | reserved u16 | bucket u32 | count u64 | body_nbytes u64 | bucket_nbytes u64
        | base_check i64 | body_check i64 | header_check i64
    SPARSE body: count indices (index_bytes each) | zero padding to 8 | count values (width each)
    RAW body:    bucket_nbytes bytes, the packed bucket

Checks, all before a byte of the target store is written: `header_check` (the header's own
fields), `body_check` (always for SPARSE; RAW only with verify: a RAW body is a full bucket
and costs a full fingerprint), and `base_check`, the fingerprint of the *base* values at
the changed positions, which the engine recomputes from its own store: an engine whose bytes
there differ from the pusher's base refuses the payload instead of producing wrong weights.

Nothing here knows a transport, an engine or a trainer: tensors and byte buffers only.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rlsync.buckets import align_up, dtype_from_name, fingerprint_int, pack_bucket
from rlsync.protocol import Bucket, BucketPlan

MAGIC = b"RLD1"
FORMAT = 1
HEADER_BYTES = 64
RAW, SPARSE = 0, 1
FLAG_BODY_CHECK = 1
_HEAD = struct.Struct("<4sHBBBBHIQQQqq")  # everything but header_check: 56 bytes
_CHECK = struct.Struct("<q")
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SAMPLE_STRIDE = 1021
"""Every 1021st unit is compared first: the estimate decides RAW at once for a dense bucket
(so a 100% change costs no full compare) and picks the change-finding method."""
TWO_LEVEL_BELOW = 0.03
"""Below this sampled fraction, find changes 8 words at a time first (`changed_units`)."""


class DeltaError(ValueError):
    """A payload that cannot be applied: corrupt, truncated, or not against this store's base."""


@dataclass(kw_only=True)
class Header:
    """The decoded 64-byte header of one bucket's payload."""

    kind: int
    width: int
    index_bytes: int
    flags: int
    bucket: int
    count: int
    body_nbytes: int
    bucket_nbytes: int
    base_check: int
    body_check: int

    def pack(self) -> bytes:
        head = _HEAD.pack(
            MAGIC,
            FORMAT,
            self.kind,
            self.width,
            self.index_bytes,
            self.flags,
            0,
            self.bucket,
            self.count,
            self.body_nbytes,
            self.bucket_nbytes,
            self.base_check,
            self.body_check,
        )
        return head + _CHECK.pack(_bytes_check(head))

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_BYTES:
            raise DeltaError(f"delta header: {len(raw)} bytes, need {HEADER_BYTES}")
        head = bytes(raw[: _HEAD.size])
        (check,) = _CHECK.unpack(bytes(raw[_HEAD.size : HEADER_BYTES]))
        if check != _bytes_check(head):
            raise DeltaError("delta header: checksum mismatch (corrupt header)")
        magic, fmt, kind, width, ibytes, flags, _, bucket, count, body, nbytes, base, bcheck = (
            _HEAD.unpack(head)
        )
        if magic != MAGIC or fmt != FORMAT:
            raise DeltaError(f"delta header: magic {magic!r} format {fmt}, want {MAGIC!r} {FORMAT}")
        if kind not in (RAW, SPARSE) or width not in _INT or ibytes not in (4, 8):
            raise DeltaError(f"delta header: kind {kind} width {width} index_bytes {ibytes}")
        return cls(
            kind=kind,
            width=width,
            index_bytes=ibytes,
            flags=flags,
            bucket=bucket,
            count=count,
            body_nbytes=body,
            bucket_nbytes=nbytes,
            base_check=base,
            body_check=bcheck,
        )


def _bytes_check(raw: bytes) -> int:
    return fingerprint_int(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def unit_width(bucket: Bucket) -> int:
    """Bytes per unit: the smallest itemsize among the bucket's tensors (all powers of two)."""
    return min((dtype_from_name(s.dtype).itemsize for s in bucket.tensors), default=1)


def sparse_body_bytes(count: int, width: int, index_bytes: int) -> int:
    return align_up(count * index_bytes, 8) + count * width


@dataclass(kw_only=True)
class Payload:
    """One bucket's encoding: `header` (64 bytes) then `body`, both 1-D uint8 CPU tensors.
    A RAW body is a view of the encoder's base buffer (valid until the next encode)."""

    header: torch.Tensor
    body: torch.Tensor
    kind: int
    changed: int
    """Units that differ from the base (all of them for RAW)."""

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.body.numel()

    def write_into(self, out: torch.Tensor) -> None:
        """Copy header and body into the front of `out` (1-D uint8, >= nbytes)."""
        out[:HEADER_BYTES].copy_(self.header)
        out[HEADER_BYTES : self.nbytes].copy_(self.body)


@dataclass(kw_only=True)
class EncodeStats:
    """What one push's encoding did (the bench and the push report read it)."""

    buckets: int = 0
    raw_buckets: int = 0
    units: int = 0
    changed_units: float = 0.0
    """Units that differ from the base: counted exactly in SPARSE buckets, estimated from
    the sample in buckets sent whole (all of them when there is no base)."""
    sent_units: int = 0
    """Units sent: the changed ones of SPARSE buckets, every unit of RAW ones."""
    raw_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    per_bucket: list[int] = field(default_factory=list)

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
        s.sent_units += payload.changed
        s.raw_bytes += bucket.nbytes
        s.wire_bytes += payload.nbytes
        s.per_bucket.append(payload.nbytes)
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
            header=_header_tensor(header), body=body, kind=RAW, changed=bucket.nbytes // width
        )


def _header_tensor(header: Header) -> torch.Tensor:
    return torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)


def _units(t: torch.Tensor, width: int) -> torch.Tensor:
    """A tensor's bytes as a flat integer tensor of `width`-byte units (no copy if contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8).view(_INT[width])


def _new_units(spec, tensors: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    src = tensors[spec.name]
    if tuple(src.shape) != tuple(spec.shape):
        raise ValueError(f"{spec.name}: shape {tuple(src.shape)} != planned {tuple(spec.shape)}")
    dtype = dtype_from_name(spec.dtype)
    if src.dtype != dtype or src.device.type != "cpu":
        src = src.to("cpu", dtype)
    return _units(src, width)


def _base_units(base: torch.Tensor, spec, width: int) -> torch.Tensor:
    return base[spec.offset : spec.offset + spec.nbytes].view(_INT[width])


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
    """The changed share of every k-th unit (at least ~512 samples per bucket)."""
    stride = max(1, min(SAMPLE_STRIDE, bucket.nbytes // width // 512))
    hits = total = 0
    for spec in bucket.tensors:
        new, old = _new_units(spec, tensors, width), _base_units(base, spec, width)
        hits += int(torch.ne(new[::stride], old[::stride]).sum())
        total += (new.numel() + stride - 1) // stride
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
        idx = torch.cat(idx_parts).to(_INT[index_bytes])
        body[:index_end].copy_(idx.view(torch.uint8))
        body[values_at:].copy_(torch.cat(new_parts).view(torch.uint8))
    old = torch.cat(old_parts) if old_parts else torch.empty(0, dtype=_INT[width])
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
    return Payload(header=_header_tensor(header), body=body, kind=SPARSE, changed=count)


# ---------------------------------------------------------------- the engine's half


class DeltaTarget(Protocol):
    """Where a payload lands (`rlsync.transports.base.WeightWriter`): named views written
    through one cancellable chokepoint."""

    def on_bucket(self, index: int, bucket: Bucket, buf: torch.Tensor) -> None: ...
    def current(self, name: str) -> torch.Tensor: ...
    def bring_to_base(self, names: list[str]) -> None: ...
    def patch(self, name: str, width: int, index: torch.Tensor, values: torch.Tensor) -> None: ...


def read_header(buf: torch.Tensor) -> Header:
    """The header at the front of `buf` (1-D uint8, any device)."""
    if buf.numel() < HEADER_BYTES:
        raise DeltaError(f"delta payload: {buf.numel()} bytes, shorter than its header")
    return Header.unpack(bytes(buf[:HEADER_BYTES].cpu().tolist()))


def apply_payload(
    g: int, bucket: Bucket, header: Header, body: torch.Tensor, target: DeltaTarget
) -> int:
    """Check payload `g` against `bucket` and the target's base, then write it; returns the
    units written. Every check runs before the first write, and raises DeltaError naming
    what is wrong."""
    _check_header(g, bucket, header, body)
    if header.flags & FLAG_BODY_CHECK and fingerprint_int(body) != header.body_check:
        raise DeltaError(f"delta bucket {g}: body checksum mismatch (corrupt payload)")
    if header.kind == RAW:
        target.on_bucket(g, bucket, body)
        return bucket.nbytes // header.width
    return _apply_sparse(g, bucket, header, body, target)


def _check_header(g: int, bucket: Bucket, header: Header, body: torch.Tensor) -> None:
    where = f"delta bucket {g}"
    if header.bucket != g or header.bucket_nbytes != bucket.nbytes:
        raise DeltaError(
            f"{where}: header names bucket {header.bucket} of {header.bucket_nbytes} bytes, "
            f"the plan's is {bucket.nbytes}"
        )
    if header.width != unit_width(bucket):
        raise DeltaError(f"{where}: width {header.width}, the plan needs {unit_width(bucket)}")
    expected = (
        bucket.nbytes
        if header.kind == RAW
        else sparse_body_bytes(header.count, header.width, header.index_bytes)
    )
    if header.body_nbytes != expected or body.numel() != expected:
        raise DeltaError(
            f"{where}: body of {body.numel()} bytes (header {header.body_nbytes}), "
            f"expected {expected}"
        )


def _apply_sparse(
    g: int, bucket: Bucket, header: Header, body: torch.Tensor, target: DeltaTarget
) -> int:
    width, count = header.width, header.count
    idx = _aligned(body[: count * header.index_bytes]).view(_INT[header.index_bytes]).long()
    values = _aligned(body[align_up(count * header.index_bytes, 8) :]).view(_INT[width])
    if count and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0):
        raise DeltaError(f"delta bucket {g}: indices not strictly ascending")
    pieces = _split(g, bucket, idx, width)
    old = [_units(target.current(name), width).index_select(0, i) for name, i, _ in pieces]
    old_all = torch.cat(old) if old else torch.empty(0, dtype=_INT[width])
    if fingerprint_int(old_all.view(torch.uint8)) != header.base_check:
        raise DeltaError(
            f"delta bucket {g}: the store's bytes at the {count} changed positions differ "
            "from the pusher's base (not the base version); send a full update"
        )
    target.bring_to_base([s.name for s in bucket.tensors])
    for name, local, sl in pieces:
        target.patch(name, width, local, values[sl])
    return count


def _split(
    g: int, bucket: Bucket, idx: torch.Tensor, width: int
) -> list[tuple[str, torch.Tensor, slice]]:
    """(name, tensor-local indices, slice of the values) per tensor with changes; every index
    must fall inside a tensor (not in padding, not past the bucket)."""
    pieces, covered = [], 0
    for spec in bucket.tensors:
        start, end = spec.offset // width, (spec.offset + spec.nbytes) // width
        lo = int(torch.searchsorted(idx, start))
        hi = int(torch.searchsorted(idx, end))
        if hi > lo:
            pieces.append((spec.name, idx[lo:hi] - start, slice(lo, hi)))
            covered += hi - lo
    if covered != idx.numel():
        raise DeltaError(
            f"delta bucket {g}: {idx.numel() - covered} indices fall outside every tensor"
        )
    return pieces


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its start is 8-byte aligned (so wider views are legal), else a copy."""
    return t if t.storage_offset() % 8 == 0 else t.clone()


def apply_region(g: int, bucket: Bucket, buf: torch.Tensor, target: DeltaTarget) -> int:
    """`apply_payload` for a payload laid out as header + body in one buffer (ipc, disk)."""
    header = read_header(buf)
    body = buf[HEADER_BYTES : HEADER_BYTES + header.body_nbytes]
    return apply_payload(g, bucket, header, body, target)


def wire_plan(plan: BucketPlan) -> BucketPlan:
    """A plan of opaque buckets, each with room for the largest payload of the same bucket
    of `plan` (a RAW one: header + the bucket): what a buffer of payloads is laid out by."""
    return BucketPlan(
        alignment=plan.alignment,
        buckets=[
            Bucket(nbytes=align_up(b.nbytes + HEADER_BYTES, plan.alignment), tensors=[])
            for b in plan.buckets
        ],
    )
