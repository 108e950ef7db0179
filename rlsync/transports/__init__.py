"""The byte-moving layer of weight sync: the vocabulary every transport shares.

A transport moves the buckets of a `BucketPlan` from one sender (the trainer's rank 0) to
one or many receivers (engines) and hands each arriving bucket to a callback:

    on_bucket(index, bucket, buf)   # buf: 1-D uint8 view of the bucket's bytes,
                                    # valid only during the call; copy out of it there

Each transport is one module holding both halves (`Sender`, `Receiver`, lifecycle in
`base`), found by kind through `registry`; this package imports none of them, so a CPU-only
install never touches CUDA code (docs/TRANSPORTS.md):

- `broadcast`: a dedicated gloo/NCCL group beside the trainer's own, double-buffered.
- `ipc`: a persistent packed buffer plus a control segment of counters; its two buffer kinds
  are `shm` (POSIX shared memory, CPU) and `cuda_ipc` (CUDA memory shared by IPC handle).
- `disk`: safetensors files in a directory, written atomically.
- `integrity`: the per-bucket fingerprint trailer behind `verify=True`.

Nothing here knows an engine or a trainer: tensors in, bytes across, views out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlsync.wire.protocol import Bucket

OnBucket = Callable[[int, Bucket, torch.Tensor], None]
"""Receiver callback: (bucket index, bucket layout, uint8 view of its bytes)."""


class TransportError(RuntimeError):
    """A transfer failed; the message names the transport, the bucket or engine, and why."""


class TransportTimeout(TransportError):
    """A wait (rendezvous, receive, or a peer's progress) ran past its timeout."""


class IntegrityError(TransportError):
    """A bucket's bytes do not match the fingerprint its sender computed."""

    def __init__(self, message: str, *, bucket: int | None = None, name: str | None = None):
        super().__init__(message)
        self.bucket = bucket
        self.name = name


@dataclass(kw_only=True)
class TransferStats:
    """What one push or receive moved and where its time went."""

    nbytes: int = 0
    """Payload bytes moved (sum of the buckets' sizes, trailers excluded)."""
    buckets: int = 0
    seconds: float = 0.0
    """Wall time of the whole call."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, e.g. pack, wait, verify, load; phases overlap in time."""
    timed_out_engines: list[int] = field(default_factory=list)
    """IPC senders only: engines that made no progress within the timeout (left behind)."""

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
