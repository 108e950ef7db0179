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

The encoder (the pusher's half) is `rlsync.plan.delta_encode`; this module is the format and the
engine's half. Nothing here knows a transport, an engine or a trainer: tensors and byte
buffers only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import torch

from rlsync.plan.buckets import align_up, dtype_from_name, fingerprint_int
from rlsync.wire.protocol import Bucket, BucketPlan

MAGIC = b"RLD1"
FORMAT = 1
HEADER_BYTES = 64
RAW, SPARSE = 0, 1
FLAG_BODY_CHECK = 1
_HEAD = struct.Struct("<4sHBBBBHIQQQqq")  # everything but header_check: 56 bytes
_CHECK = struct.Struct("<q")
INT_TYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Unit width in bytes -> the integer dtype units are compared and moved as."""


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
        if kind not in (RAW, SPARSE) or width not in INT_TYPES or ibytes not in (4, 8):
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


def units_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """A tensor's bytes as a flat integer tensor of `width`-byte units (no copy if contiguous)."""
    flat = t.reshape(-1)
    if flat.stride(0) != 1:  # a strided slice (one of 0 or 1 element counts as contiguous)
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8).view(INT_TYPES[width])


def header_tensor(header: Header) -> torch.Tensor:
    return torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)


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
    idx = _aligned(body[: count * header.index_bytes]).view(INT_TYPES[header.index_bytes]).long()
    values = _aligned(body[align_up(count * header.index_bytes, 8) :]).view(INT_TYPES[width])
    if count and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0):
        raise DeltaError(f"delta bucket {g}: indices not strictly ascending")
    pieces = _split(g, bucket, idx, width)
    old = [units_of(target.current(name), width).index_select(0, i) for name, i, _ in pieces]
    old_all = torch.cat(old) if old else torch.empty(0, dtype=INT_TYPES[width])
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
