"""Row-range broadcasts: the broadcast transport for a sharded trainer (FSDP2), whose ranks
each hold some dim-0 rows of every tensor and send only those.

A sharded weights group is one broadcast group per sending rank (`<group>/s<r>`: trainer
rank r is its rank 0, the engines follow), all met at one store, so no trainer rank ever
receives another's bytes. `rows[name]` lists a tensor's row boundaries b_0 = 0 <= b_1 <=
... <= b_S = its rows: sender r owns rows [b_r, b_r+1). A row-major tensor's rows are
contiguous, so sender r's part of bucket g is a list of byte ranges of the bucket
(`pieces`), one per tensor it holds rows of. On the wire a part is those ranges back to
back; a part of one range (a large tensor has a bucket of its own) is exactly that range:
received in place in the engine's store, and sent straight from the trainer's shard when
it needs no cast. A part of several ranges is packed by its sender and scattered by the
engine (these are the small tensors).

Every sender streams its parts at its own pace; the engine receives from all senders at
once (a thread per sender) and hands a bucket on (`landed`, or `on_bucket` for a staged
engine) only once every sender's part of it has arrived, in bucket order. Every wait is
bounded as in `rlsync.transports.broadcast`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from rlsync.plan.buckets import dtype_from_name, fingerprint, plan_total_bytes
from rlsync.transports import OnBucket, TransferStats, TransportTimeout, base
from rlsync.transports.broadcast_group import IN_FLIGHT, BroadcastGroup, as_wire, finish, holds
from rlsync.transports.integrity import TRAILER_BYTES, check_apart
from rlsync.wire.protocol import Bucket, BucketPlan, TensorSpec

Rows = Mapping[str, list[int]]
"""tensor name -> its row boundaries, one more than there are senders."""


def sender_group(group_name: str, sender: int) -> str:
    """The name of sender `sender`'s broadcast group within a sharded weights group."""
    return f"{group_name}/s{sender}"


def row_count(spec: TensorSpec) -> int:
    """Dim 0 of a tensor; a 0-dim tensor counts as one row."""
    return spec.shape[0] if spec.shape else 1


class Piece(NamedTuple):
    """Sender r's rows [lo, hi) of one tensor: bytes [at, at + nbytes) of its bucket."""

    spec: TensorSpec
    lo: int
    hi: int
    at: int
    nbytes: int


def pieces(bucket: Bucket, rows: Rows, sender: int) -> list[Piece]:
    """What `sender` sends of `bucket`, in the bucket's tensor order."""
    out = []
    for spec in bucket.tensors:
        lo, hi = rows[spec.name][sender], rows[spec.name][sender + 1]
        if hi > lo:
            row_bytes = spec.nbytes // row_count(spec)
            out.append(Piece(spec, lo, hi, spec.offset + lo * row_bytes, (hi - lo) * row_bytes))
    return out


def check_rows(plan: BucketPlan, rows: Rows, senders: int) -> None:
    """Raise ValueError naming the first tensor whose boundaries do not split it among
    `senders` senders (and any name the plan does not carry)."""
    specs = {s.name: s for b in plan.buckets for s in b.tensors}
    extra = sorted(set(rows) - set(specs))
    if extra:
        raise ValueError(f"rows: {extra[0]!r} is not a tensor of the plan")
    for name, spec in specs.items():
        bounds = rows.get(name)
        n = row_count(spec)
        if bounds is None:
            raise ValueError(f"rows: {name!r} is missing ({senders} senders)")
        if len(bounds) != senders + 1:
            raise ValueError(
                f"rows[{name!r}]: {len(bounds)} boundaries, {senders} senders need {senders + 1}"
            )
        if bounds[0] != 0 or bounds[-1] != n or bounds != sorted(bounds):
            raise ValueError(f"rows[{name!r}]: {bounds} does not split its {n} rows in order")
        if spec.nbytes % n:
            raise ValueError(f"rows[{name!r}]: {spec.nbytes} bytes are not {n} equal rows")


def _part_bytes(parts: list[list[Piece]]) -> int:
    """Room a packing (or scatter) buffer needs: the largest part of several pieces."""
    return max((sum(p.nbytes for p in ps) for ps in parts if len(ps) > 1), default=0)


# ---------------------------------------------------------------- trainer half


def send_rows(
    group: BroadcastGroup,
    plan: BucketPlan,
    rows: Rows,
    sender: int,
    local: Mapping[str, torch.Tensor],
    *,
    verify: bool = False,
    timeout_s: float = 60.0,
    on_sent: Callable[[int], None] | None = None,
) -> TransferStats:
    """Trainer rank `sender` (rank 0 of `group`): broadcast its part of every bucket of
    `plan`. `local[name]` is this rank's rows of each tensor, rows[name][sender] onwards
    (cast to the plan's dtype on packing). `on_sent(g)` is told, in order, once the part of
    bucket g is on every engine (or there was none)."""
    t0 = time.perf_counter()
    parts = [pieces(b, rows, sender) for b in plan.buckets]
    stats = TransferStats(nbytes=sum(p.nbytes for ps in parts for p in ps), buckets=len(parts))
    solos = [_solo(ps, local, group.device) for ps in parts]
    packs = [ps for ps, solo in zip(parts, solos, strict=True) if ps and solo is None]
    bufs = group.buffers(max((sum(p.nbytes for p in ps) for ps in packs), default=0))
    trailers = [
        torch.zeros(TRAILER_BYTES, dtype=torch.uint8, device=group.device)
        for _ in range(IN_FLIGHT if verify else 0)
    ]
    inflight: deque[tuple[int, list[Any], int | None]] = deque()
    packed = 0

    def finish_one() -> None:
        g, works, _ = inflight.popleft()
        finish(group, works, timeout_s, f"bucket {g} (rows of sender {sender})", stats)
        if on_sent is not None:
            on_sent(g)

    for g, (ps, solo) in enumerate(zip(parts, solos, strict=True)):
        slot = packed % 2 if ps and solo is None else None
        while inflight and (len(inflight) >= IN_FLIGHT or holds(inflight, slot)):
            finish_one()
        works: list[Any] = []
        if ps:
            t = time.perf_counter()
            if solo is not None:
                wire = solo
            else:
                wire = _pack(ps, local, bufs[packed % 2])
                packed += 1
            stats.add("pack", time.perf_counter() - t)
            works.append(group.broadcast_async(wire, timeout_s))
            if verify:
                trailer = trailers[g % IN_FLIGHT]
                trailer.copy_(fingerprint(wire).reshape(1).view(torch.uint8))
                works.append(group.broadcast_async(trailer, timeout_s))
        inflight.append((g, works, slot))
    while inflight:
        finish_one()
    stats.seconds = time.perf_counter() - t0
    return stats


def _solo(ps: list[Piece], local: Mapping[str, torch.Tensor], device: torch.device) -> Any:
    """A one-range part straight from the trainer's rows when it needs no cast; else None."""
    if len(ps) != 1:
        return None
    return as_wire(local[ps[0].spec.name], ps[0].spec.dtype, ps[0].nbytes, device)


def _pack(ps: list[Piece], local: Mapping[str, torch.Tensor], buf: torch.Tensor) -> Any:
    """The pieces back to back in `buf`, cast to the plan's dtypes."""
    total, pos = sum(p.nbytes for p in ps), 0
    for p in ps:
        src = local[p.spec.name]
        dst = buf[pos : pos + p.nbytes].view(dtype_from_name(p.spec.dtype))
        dst.view(src.shape).copy_(src)
        pos += p.nbytes
    return buf[:total]


# ---------------------------------------------------------------- engine half


def recv_rows(
    groups: list[BroadcastGroup],
    plan: BucketPlan,
    rows: Rows,
    on_bucket: OnBucket,
    *,
    region: Callable[[Bucket], torch.Tensor | None] | None = None,
    landed: Callable[[Bucket], None] | None = None,
    verify: bool = False,
    timeout_s: float = 60.0,
    cancel: threading.Event | None = None,
    first_timeout_s: float | None = None,
) -> TransferStats:
    """An engine: receive every sender's part of every bucket of `plan` (groups[r] is
    sender r's group), in place in the store when `region` gives its bytes, else into one
    of two staging buffers handed to `on_bucket`. Buckets are handed on in order, each once
    all its parts are in; the first error of any sender ends the receive."""
    t0 = time.perf_counter()
    first = timeout_s if first_timeout_s is None else first_timeout_s
    n = len(plan.buckets)
    in_place = n > 0 and region is not None and region(plan.buckets[0]) is not None
    largest = max((b.nbytes for b in plan.buckets), default=0)
    staging = [] if in_place else groups[0].buffers(largest, "stage")
    board = _Board(n, len(groups), staging, cancel)
    dest = (lambda g: region(plan.buckets[g])) if in_place else board.staging_for  # type: ignore[misc]
    workers = [
        _SenderStream(r, group, plan, rows, dest, board, verify, timeout_s, first)
        for r, group in enumerate(groups)
    ]
    for w in workers:
        w.thread.start()
    stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=n)
    try:
        for g, bucket in enumerate(plan.buckets):
            board.wait_landed(g, first + timeout_s if g == 0 else 2 * timeout_s)
            t = time.perf_counter()
            if in_place:
                if landed is not None:
                    landed(bucket)
            else:
                on_bucket(g, bucket, staging[g % 2][: bucket.nbytes])
            board.consumed(g)
            stats.add("load", time.perf_counter() - t)
    except BaseException as exc:
        board.fail(exc)
        for w in workers:  # each of their waits is bounded: they end
            w.thread.join(2 * timeout_s + 5)
        raise
    for w in workers:
        w.thread.join(timeout_s)
        stats.add("wait", w.stats.phases.get("wait", 0.0))
    stats.seconds = time.perf_counter() - t0
    return stats


class _Board:
    """What the sender streams and the handing-on loop share: how many parts of each bucket
    are still out, how far buckets were handed on (a staging buffer is free once the bucket
    two before it was), and the first error."""

    def __init__(
        self, n: int, senders: int, staging: list[torch.Tensor], cancel: threading.Event | None
    ):
        self.left = [senders] * n
        self.done_upto = -1
        self.staging = staging
        self.cancel = cancel
        self.error: BaseException | None = None
        self.cv = threading.Condition()

    def land(self, g: int) -> None:
        with self.cv:
            self.left[g] -= 1
            self.cv.notify_all()

    def consumed(self, g: int) -> None:
        with self.cv:
            self.done_upto = g
            self.cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cv:
            self.error = self.error or exc
            self.cv.notify_all()

    def wait_landed(self, g: int, timeout_s: float) -> None:
        self._wait(lambda: self.left[g] == 0, timeout_s, f"bucket {g}: not every sender's part")

    def staging_for(self, g: int) -> torch.Tensor:
        """Staging buffer g % 2, once bucket g - 2 (its last user) was handed on."""
        self._wait(lambda: self.done_upto >= g - 2, float("inf"), f"bucket {g}: staging")
        return self.staging[g % 2]

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while not ready():
                if self.error is not None:  # a sender's own error names its group and bucket
                    raise self.error
                if self.cancel is not None and self.cancel.is_set():
                    raise base.Cancelled(f"row receive cancelled ({what})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(f"{what} arrived within {timeout_s:.1f}s")
                self.cv.wait(min(left, 0.2))


class _SenderStream:
    """One sender's parts, received in bucket order on a thread of its own: up to
    `IN_FLIGHT` receives posted ahead, a part of several pieces into one of two scatter
    buffers (copied to its ranges when it lands), every part checked against its trailer."""

    def __init__(
        self,
        sender: int,
        group: BroadcastGroup,
        plan: BucketPlan,
        rows: Rows,
        dest: Callable[[int], torch.Tensor | None],
        board: _Board,
        verify: bool,
        timeout_s: float,
        first_timeout_s: float,
    ):
        self.sender, self.group, self.plan, self.dest, self.board = sender, group, plan, dest, board
        self.verify, self.timeout_s, self.first = verify, timeout_s, first_timeout_s
        self.parts = [pieces(b, rows, sender) for b in plan.buckets]
        self.scatter = group.buffers(_part_bytes(self.parts))
        self.trailers = [torch.zeros(TRAILER_BYTES, dtype=torch.uint8) for _ in range(IN_FLIGHT)]
        self.stats = TransferStats()
        self.inference = torch.is_inference_mode_enabled()  # as the engine's tensors are
        self.thread = threading.Thread(target=self._run, name=f"rows-s{sender}", daemon=True)

    def _run(self) -> None:
        try:
            with torch.inference_mode(self.inference):  # as the receive that started it
                self._receive()
        except BaseException as exc:  # handed to the loop, which raises it
            self.board.fail(exc)

    def _receive(self) -> None:
        inflight: deque[tuple[int, list[Any], Any, int | None]] = deque()
        scattered = 0
        for g, ps in enumerate(self.parts):
            slot = scattered % 2 if len(ps) > 1 else None
            while inflight and (
                len(inflight) >= IN_FLIGHT
                or holds(inflight, slot)
                or (self.board.staging and inflight[0][0] <= g - 2)  # frees staging g - 2
            ):
                self._land(*inflight.popleft())
            if self.board.error is not None:
                return
            if not ps:
                inflight.append((g, [], None, None))
                continue
            timeout = self.first if g < IN_FLIGHT else self.timeout_s
            works, posted = self._post(g, ps, slot, timeout)
            scattered += slot is not None
            inflight.append((g, works, posted, slot))
        while inflight:
            self._land(*inflight.popleft())

    def _post(self, g: int, ps: list[Piece], slot: int | None, timeout: float) -> tuple:
        """Post bucket g's receive(s): the work handles, and (pieces, where the bucket lands,
        where its part lands, its trailer) for `_land`."""
        target = self.dest(g)
        assert target is not None
        if slot is None:
            wire = target[ps[0].at : ps[0].at + ps[0].nbytes]
        else:
            wire = self.scatter[slot][: sum(p.nbytes for p in ps)]
        works = [self.group.broadcast_async(wire, timeout)]
        trailer = None
        if self.verify:
            trailer = self.trailers[g % IN_FLIGHT].to(self.group.device)
            works.append(self.group.broadcast_async(trailer, timeout))
        return works, (ps, target, wire, trailer)

    def _land(self, g: int, works: list[Any], posted: Any, slot: int | None) -> None:
        timeout = self.first if g < IN_FLIGHT else self.timeout_s
        what = f"bucket {g} (rows of sender {self.sender})"
        finish(self.group, works, timeout, what, self.stats)
        if posted is not None:
            ps, target, wire, trailer = posted
            if trailer is not None:
                check_apart(g, wire, trailer)
            if slot is not None:
                pos = 0
                for p in ps:
                    target[p.at : p.at + p.nbytes].copy_(wire[pos : pos + p.nbytes])
                    pos += p.nbytes
        self.board.land(g)
