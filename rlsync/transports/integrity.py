"""Per-bucket fingerprint trailer: how `verify=True` catches corrupted or torn buckets.

With verify on, a transport buffer holds a bucket's `nbytes` bytes followed by an 8-byte
trailer: `fingerprint(buf[:nbytes])` as one int64, computed on the buffer's own device (no
host round trip on the sender). The receiver recomputes the fingerprint of what arrived and
raises `IntegrityError` naming the bucket BEFORE anyone loads it. Nothing here knows which
transport moved the bytes.
"""

from __future__ import annotations

import torch

from rlsync.plan.buckets import fingerprint
from rlsync.transports import IntegrityError

TRAILER_BYTES = 8


def wire_bytes(nbytes: int, verify: bool) -> int:
    """Bytes a bucket of `nbytes` occupies in a transport buffer."""
    return nbytes + (TRAILER_BYTES if verify else 0)


def seal(index: int, buf: torch.Tensor, nbytes: int) -> None:
    """Write the fingerprint of `buf[:nbytes]` into `buf[nbytes:nbytes + 8]`, on buf's device."""
    _trailer(buf, nbytes).copy_(fingerprint(buf[:nbytes]).reshape(1).view(torch.uint8))


def check(index: int, buf: torch.Tensor, nbytes: int) -> None:
    """Raise IntegrityError naming bucket `index` unless its trailer matches its bytes."""
    check_apart(index, buf[:nbytes], _trailer(buf, nbytes))


def check_apart(index: int, buf: torch.Tensor, trailer: torch.Tensor) -> None:
    """`check` for a bucket whose 8-byte trailer may sit apart from its bytes (a bucket
    received in place into an engine's store gets its trailer in a buffer of its own)."""
    expected = trailer.clone().view(torch.int64)[0]
    got = fingerprint(buf)
    if not bool(torch.eq(expected, got)):
        raise IntegrityError(
            f"bucket {index}: fingerprint mismatch ({buf.numel()} bytes: sent "
            f"{int(expected):#x}, received {int(got):#x})",
            bucket=index,
        )


def _trailer(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < nbytes + TRAILER_BYTES:
        raise ValueError(f"verify needs a 1-D uint8 buffer of >= {nbytes + TRAILER_BYTES} bytes")
    # Kept as bytes: an int64 view would need an 8-byte aligned storage offset.
    return buf[nbytes : nbytes + TRAILER_BYTES]
