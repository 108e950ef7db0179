"""Broadcast transport: a dedicated weights group (trainer = rank 0, engines = ranks 1..N).

The group (`broadcast_group.BroadcastGroup`) is built from its own TCPStore rendezvous
(hosted by rank 0, keys under a `group_name` prefix) and the backend is constructed directly - gloo on CPU, NCCL on CUDA,
same code - so it is never registered as torch.distributed's default group and lives beside
a trainer's own DDP/FSDP group. Every wait is bounded: the rendezvous, each broadcast (the
op's own timeout plus a bounded `Work.wait`), and a peer that dies breaks the connection
and raises at once. After any error, `destroy()` the group and create a fresh one (on a new
port); the process keeps running.

Pushes are double-buffered: the sender packs bucket g+1 into the second buffer while
bucket g is on the wire, and a receiver posts the receive of bucket g+1 before loading g.
The two buffers are allocated once per group (grown if a plan needs more) and reused.

A sharded trainer's weights group is one such group per trainer rank (`InitWeightsGroup.
senders`); its updates carry `rows`, and `broadcast_rows` moves them.

NCCL note: a collective that outlives the group timeout trips NCCL's watchdog, whose
default reaction (TORCH_NCCL_ASYNC_ERROR_HANDLING) may end the process; engines that must
survive a dead trainer should set that variable to 2 (abort the communicator only).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rlsync.plan import delta
from rlsync.plan.buckets import fingerprint, in_store, pack_bucket, plan_total_bytes
from rlsync.transports import OnBucket, TransferStats, TransportError, base, integrity
from rlsync.transports.broadcast_group import IN_FLIGHT, BroadcastGroup, as_wire, finish, holds
from rlsync.transports.sharded.broadcast_rows import check_rows, recv_rows, sender_group
from rlsync.wire.netutil import free_port
from rlsync.wire.protocol import (
    Bucket,
    BucketPlan,
    DestroyWeightsGroup,
    InitWeightsGroup,
    Message,
    Result,
    UpdateWeightsFromDistributed,
    failed,
)


def _wire_bytes(buckets: list[Bucket], verify: bool) -> int:
    """Room one staging buffer needs: the largest of `buckets` on the wire."""
    return max((integrity.wire_bytes(b.nbytes, verify) for b in buckets), default=0)


def send_buckets(
    group: BroadcastGroup,
    plan: BucketPlan,
    tensors: Mapping[str, torch.Tensor],
    *,
    verify: bool = False,
    timeout_s: float = 60.0,
) -> TransferStats:
    """Rank 0: broadcast every bucket of `plan`, packing the next bucket while earlier ones
    are in flight (two packing buffers). Buckets of a plan that follows the engines' store
    (`in_store`) land there in place on every engine: up to `IN_FLIGHT` of them travel at
    once, a one-tensor bucket goes out straight from the trainer's tensor when it can
    (`sent_as_is`), and a verify trailer travels as a broadcast of its own."""
    if group.rank != 0:
        raise TransportError(f"send_buckets on rank {group.rank}: only rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
    apart = in_store(plan)
    solos = [sent_as_is(b, tensors, group.device) if apart else None for b in plan.buckets]
    packs = [b for b, solo in zip(plan.buckets, solos, strict=True) if solo is None]
    bufs = group.buffers(_wire_bytes(packs, verify))  # only buckets that are packed need room
    window = IN_FLIGHT if apart else 2
    trailers = [
        torch.zeros(integrity.TRAILER_BYTES, dtype=torch.uint8, device=group.device)
        for _ in range(window if verify else 0)
    ]
    inflight: deque[tuple[int, list[Any], int | None]] = deque()  # bucket, works, buffer
    packed = 0
    for g, (bucket, solo) in enumerate(zip(plan.buckets, solos, strict=True)):
        slot = None if solo is not None else packed % 2
        while inflight and (len(inflight) >= window or holds(inflight, slot)):
            done, works, _ = inflight.popleft()  # frees a place in the window, or buffer slot
            finish(group, works, timeout_s, f"bucket {done}", stats)
        t = time.perf_counter()
        if solo is not None:  # the trainer's own bytes go out: nothing to pack
            parts = [solo]
            if verify:
                trailer = trailers[g % window]
                trailer.copy_(fingerprint(solo).reshape(1).view(torch.uint8))
                parts.append(trailer)
        else:
            buf = bufs[packed % 2][: integrity.wire_bytes(bucket.nbytes, verify)]
            packed += 1
            pack_bucket(bucket, tensors, buf)
            if verify:
                integrity.seal(g, buf, bucket.nbytes)
            parts = [buf[: bucket.nbytes], buf[bucket.nbytes :]] if apart and verify else [buf]
        stats.add("pack", time.perf_counter() - t)
        inflight.append((g, [group.broadcast_async(part, timeout_s) for part in parts], slot))
    while inflight:
        done, works, _ = inflight.popleft()
        finish(group, works, timeout_s, f"bucket {done}", stats)
    stats.seconds = time.perf_counter() - t0
    return stats


def sent_as_is(
    bucket: Bucket, tensors: Mapping[str, torch.Tensor], device: torch.device
) -> torch.Tensor | None:
    """The bytes of a one-tensor bucket exactly as the wire carries them, straight from the
    trainer's tensor (no packing copy) when it already has the planned dtype and shape, is
    contiguous on the group's device and fills the bucket to its last byte; else None."""
    if len(bucket.tensors) != 1:
        return None
    spec, src = bucket.tensors[0], tensors[bucket.tensors[0].name]
    if spec.offset or spec.nbytes != bucket.nbytes or tuple(src.shape) != tuple(spec.shape):
        return None
    return as_wire(src, spec.dtype, bucket.nbytes, device)


def recv_buckets(
    group: BroadcastGroup,
    plan: BucketPlan,
    on_bucket: OnBucket,
    *,
    region: Callable[[Bucket], torch.Tensor | None] | None = None,
    landed: Callable[[Bucket], None] | None = None,
    verify: bool = False,
    timeout_s: float = 60.0,
    cancel: threading.Event | None = None,
    first_timeout_s: float | None = None,
) -> TransferStats:
    """Ranks > 0: receive every bucket of `plan`, with later receives posted before bucket g
    is handled. When `region` gives the bytes of the store each bucket belongs to, buckets
    are received there in place, up to `IN_FLIGHT` posted ahead, and reported to `landed`;
    otherwise each is received into one of two staging buffers (one posted ahead) and handed
    to `on_bucket` to copy. A set `cancel` stops it between buckets (a receive already
    posted still completes or times out, but nothing more is posted). Receives posted before
    rank 0 may have started wait `first_timeout_s`."""
    if group.rank == 0:
        raise TransportError("recv_buckets on rank 0: rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
    n = len(plan.buckets)
    first = timeout_s if first_timeout_s is None else first_timeout_s
    in_place = n > 0 and region is not None and region(plan.buckets[0]) is not None
    bufs = [] if in_place else group.buffers(_wire_bytes(plan.buckets, verify))
    window = IN_FLIGHT if in_place else 2
    slots = _RecvSlots(group, plan, bufs, region if in_place else None, verify, window)
    pending: deque[list[Any]] = deque()
    for g, bucket in enumerate(plan.buckets):
        while len(pending) + g < min(n, g + window):  # keep `window` receives posted
            posted = g + len(pending)
            pending.append(slots.post(posted, first if posted < window else timeout_s, cancel))
        finish(group, pending.popleft(), first if g == 0 else timeout_s, f"bucket {g}", stats)
        _check_cancel(cancel, g)
        t = time.perf_counter()
        target, trailer = slots.placed.pop(g)
        if trailer is not None:
            integrity.check_apart(g, target[: bucket.nbytes], trailer)
            stats.add("verify", time.perf_counter() - t)
            t = time.perf_counter()
        if in_place:
            if landed is not None:
                landed(bucket)
        else:
            on_bucket(g, bucket, target[: bucket.nbytes])
        stats.add("load", time.perf_counter() - t)
    stats.seconds = time.perf_counter() - t0
    return stats


class _RecvSlots:
    """Where each bucket of one receive lands: its range of the store (`region` given), or
    staging buffer g % 2; with verify, where its trailer lands."""

    def __init__(
        self,
        group: BroadcastGroup,
        plan: BucketPlan,
        bufs: list[torch.Tensor],
        region: Callable[[Bucket], torch.Tensor | None] | None,
        verify: bool,
        window: int,
    ):
        self.group, self.plan, self.bufs, self.region = group, plan, bufs, region
        self.verify = verify
        self.placed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        """bucket -> (where its bytes land, where its trailer lands)"""
        self._trailers = [
            torch.zeros(integrity.TRAILER_BYTES, dtype=torch.uint8) for _ in range(window)
        ]

    def post(self, g: int, timeout_s: float, cancel: threading.Event | None) -> list[Any]:
        """Post the receive(s) of bucket g; returns their work handles."""
        _check_cancel(cancel, g)
        bucket = self.plan.buckets[g]
        store = self.region(bucket) if self.region is not None else None
        if store is not None:
            trailer = None
            if self.verify:
                trailer = self._trailers[g % len(self._trailers)].to(store.device)
            self.placed[g] = (store, trailer)
            parts = [store] + ([trailer] if trailer is not None else [])
        else:
            wire = self.bufs[g % 2][: integrity.wire_bytes(bucket.nbytes, self.verify)]
            trailer = wire[bucket.nbytes :] if self.verify else None
            self.placed[g] = (wire, trailer)
            parts = [wire]
        return [self.group.broadcast_async(part, timeout_s) for part in parts]


def send_payloads(
    group: BroadcastGroup, count: int, encode: base.Encode, *, timeout_s: float = 60.0
) -> TransferStats:
    """Rank 0: for each of `count` buckets, broadcast its delta header, then its body (whose
    size the header gives the receivers). Bucket g+1 is encoded while g is on the wire;
    bodies go out from the encoder's own tensors, with no packing copy."""
    if group.rank != 0:
        raise TransportError(f"send_payloads on rank {group.rank}: only rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(buckets=count)
    inflight: list[tuple[int, Any, Any, Any]] = []  # bucket, works, and what they send
    for g in range(count):
        t = time.perf_counter()
        payload = encode(g)
        stats.add("encode", time.perf_counter() - t)
        stats.nbytes += payload.nbytes
        if group.device.type != "cpu":  # NCCL: the encoder works in host memory
            payload.header, payload.body = (
                payload.header.to(group.device),
                payload.body.to(group.device),
            )
        works = [group.broadcast_async(payload.header, timeout_s)]
        works.append(group.broadcast_async(payload.body, timeout_s))
        inflight.append((g, works, payload, None))
        while len(inflight) > 1:  # at most this bucket and the one before in flight
            _finish_payload(group, inflight.pop(0), timeout_s, stats)
    while inflight:
        _finish_payload(group, inflight.pop(0), timeout_s, stats)
    stats.seconds = time.perf_counter() - t0
    return stats


def _finish_payload(
    group: BroadcastGroup, item: tuple, timeout_s: float, stats: TransferStats
) -> None:
    finish(group, item[1], timeout_s, f"delta bucket {item[0]}", stats)


OnPayload = Callable[[int, delta.Header, torch.Tensor], None]
"""Receiver callback for delta payloads: (bucket index, header, body bytes)."""


def recv_payloads(
    group: BroadcastGroup,
    count: int,
    on_payload: OnPayload,
    *,
    max_body: int,
    timeout_s: float = 60.0,
    cancel: threading.Event | None = None,
    first_timeout_s: float | None = None,
) -> TransferStats:
    """Ranks > 0: receive `count` delta payloads (header, then a body of the size it names,
    at most `max_body`) and hand each to `on_payload`. The body of bucket g+1 is posted
    before g is applied, so applying overlaps the next transfer; bodies land in the group's
    two reusable buffers, as buckets do."""
    if group.rank == 0:
        raise TransportError("recv_payloads on rank 0: rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(buckets=count)
    heads = [torch.empty(delta.HEADER_BYTES, dtype=torch.uint8, device=group.device) for _ in "ab"]
    bodies = group.buffers(max_body)
    first = timeout_s if first_timeout_s is None else first_timeout_s
    if count == 0:
        return stats
    pending_head = group.broadcast_async(heads[0], first)
    header, body, body_work = _post_body(group, 0, heads, bodies, pending_head, first, stats)
    for g in range(count):
        _check_cancel(cancel, g)
        next_head = group.broadcast_async(heads[(g + 1) % 2], timeout_s) if g + 1 < count else None
        finish(group, [body_work], first if g == 0 else timeout_s, f"delta bucket {g}", stats)
        following = None
        if next_head is not None:
            following = _post_body(group, g + 1, heads, bodies, next_head, timeout_s, stats)
        _check_cancel(cancel, g)
        t = time.perf_counter()
        on_payload(g, header, body)
        stats.add("load", time.perf_counter() - t)
        stats.nbytes += delta.HEADER_BYTES + body.numel()
        if following is not None:
            header, body, body_work = following
    stats.seconds = time.perf_counter() - t0
    return stats


def _post_body(
    group: BroadcastGroup,
    g: int,
    heads: list[torch.Tensor],
    bodies: list[torch.Tensor],
    head_work: Any,
    timeout_s: float,
    stats: TransferStats,
) -> tuple[delta.Header, torch.Tensor, Any]:
    """Wait for bucket g's header, then post the receive of its body into buffer g % 2."""
    finish(group, [head_work], timeout_s, f"delta header {g}", stats)
    header = delta.read_header(heads[g % 2])
    if header.body_nbytes > bodies[g % 2].numel():
        raise delta.DeltaError(
            f"delta bucket {g}: body of {header.body_nbytes} bytes, the plan allows "
            f"{bodies[g % 2].numel()}"
        )
    body = bodies[g % 2][: header.body_nbytes]
    return header, body, group.broadcast_async(body, timeout_s)


def _check_cancel(cancel: threading.Event | None, g: int) -> None:
    if cancel is not None and cancel.is_set():
        raise base.Cancelled(f"broadcast receive cancelled before bucket {g}")


# ---------------------------------------------------------------- the two halves


class Sender(base.Sender):
    """Trainer half: rank 0 of a dedicated group whose ranks 1..N are the live engines."""

    kind = "broadcast"
    can_rebuild = True
    solo_bytes = 1 << 20  # sent straight from the trainer's tensor, no packing copy
    senders = 1
    """Trainer ranks that send (a sharded trainer's sender sets its world size)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.group: BroadcastGroup | None = None
        self.group_name = ""
        self.members: list[str] = []
        self._form(self.engines.live())

    def _form(self, names: list[str]) -> None:
        """Rendezvous: every engine joins from its loop while rank 0 joins here; all bounded.
        With no engine left to join (all given up on) there is no group: the push then
        reaches nobody and says so, and the next push forms one with whoever is back."""
        if not names:
            self.group, self.members = None, []
            return
        cfg = self.cfg
        backend = (
            cfg.backend
            if cfg.backend != "auto"
            else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        port = free_port(cfg.master_address)
        self.group_name = f"weights-{uuid.uuid4().hex[:8]}"
        init = InitWeightsGroup(
            master_address=cfg.master_address,
            master_port=port,
            world_size=len(names) + 1,
            group_name=self.group_name,
            backend=backend,
            timeout_s=cfg.timeout_s,
            senders=self.senders,
        )
        rids = self.engines.send(
            {n: dataclasses.replace(init, rank_offset=i + 1) for i, n in enumerate(names)}
        )
        try:
            self.group = self._join(init)
        except BaseException:
            self.engines.gather(rids, 0.0)  # give up on their joins: the clients forget them
            raise
        replies = self.engines.gather(rids, cfg.timeout_s)
        refused = {n: why for n, r in replies.items() if (why := failed(r)) is not None}
        if refused:
            self.group.destroy()
            raise TransportError(f"weights group rendezvous failed: {refused}")
        self.members = names

    def _join(self, init: InitWeightsGroup) -> BroadcastGroup:
        """Rank 0's own place in the group the engines were just asked to join."""
        return BroadcastGroup.create(
            master_address=init.master_address,
            master_port=init.master_port,
            rank=0,
            world_size=init.world_size,
            backend=init.backend,
            timeout_s=init.timeout_s,
            group_name=init.group_name,
        )

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromDistributed:
        return UpdateWeightsFromDistributed(
            group_name=self.group_name, plan=update.plan, plan_id=update.plan_id, **update.fields
        )

    def send(self, plan: BucketPlan, tensors: base.Tensors, accepted: list[str]) -> None:
        self._check_accepted(accepted)
        assert self.group is not None
        send_buckets(
            self.group, plan, tensors, verify=self.cfg.verify, timeout_s=self.cfg.timeout_s
        )

    def send_encoded(self, plan: BucketPlan, encode: base.Encode, accepted: list[str]) -> None:
        self._check_accepted(accepted)
        assert self.group is not None
        send_payloads(self.group, len(plan.buckets), encode, timeout_s=self.cfg.timeout_s)

    def _check_accepted(self, accepted: list[str]) -> None:
        """A broadcast needs every member. Without one, break the group before a byte
        moves: the members that accepted are waiting in it, and a closed group fails their
        receive at once instead of after their first-bucket timeout (which the pusher,
        gathering their UpdateDone, would wait out too)."""
        if sorted(accepted) != sorted(self.members):
            if self.group is not None:
                self.group.destroy()
                self.group = None
            refused = sorted(set(self.members) - set(accepted))
            raise TransportError(
                f"engines {refused} refused the update; a broadcast needs every member"
            )

    def rebuild(self, names: list[str] | None = None) -> None:
        self._dissolve()
        self._form(self.engines.live() if names is None else names)

    def _dissolve(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
        live = [n for n in self.members if n not in self.engines.dead]
        rids = self.engines.send({n: DestroyWeightsGroup(group_name=self.group_name) for n in live})
        self.engines.gather(rids, min(self.cfg.timeout_s, 10.0))

    def close(self) -> None:
        self._dissolve()


class _Join:
    """One engine's rendezvous with a group, on its own thread (rank 0 may be late): one
    broadcast group, or one per sender of a sharded trainer."""

    def __init__(self, msg: InitWeightsGroup):
        self.msg, self.groups, self.error = msg, list[BroadcastGroup](), ""
        self.thread = threading.Thread(target=self._run, name=f"join-{msg.group_name}", daemon=True)

    def _run(self) -> None:
        msg = self.msg
        names = [msg.group_name]
        if msg.senders > 1:
            names = [sender_group(msg.group_name, r) for r in range(msg.senders)]
        try:
            self.groups = BroadcastGroup.join(
                msg.master_address,
                msg.master_port,
                dict.fromkeys(names, msg.rank_offset),
                msg.world_size,
                members=msg.world_size + msg.senders - 1,
                host=False,
                backend=msg.backend,
                timeout_s=msg.timeout_s,
            )
        except Exception as exc:  # reported in the Result; the engine loop goes on
            self.error = f"{type(exc).__name__}: {exc}"


class Receiver(base.Receiver):
    """Engine half: the groups this engine joined, by name. A join waits for rank 0 on a
    worker thread (up to its timeout) while the engine loop keeps answering."""

    kind = "broadcast"
    control_messages = (InitWeightsGroup, DestroyWeightsGroup)

    def __init__(self) -> None:
        self.groups: dict[str, list[BroadcastGroup]] = {}
        """group name -> its broadcast groups: one, or one per sender of a sharded trainer"""
        self.joins: dict[str, _Join] = {}

    def handle(self, msg: Message) -> list[Message]:
        if isinstance(msg, DestroyWeightsGroup):
            found = self.destroy_group(msg.group_name)
            text = "destroyed" if found else f"no group {msg.group_name!r}"
            return [Result(request_id=msg.request_id, success=found, message=text)]
        assert isinstance(msg, InitWeightsGroup)
        if msg.group_name in self.groups or msg.group_name in self.joins:
            raise ValueError(f"group {msg.group_name!r} already exists; destroy it first")
        join = self.joins[msg.group_name] = _Join(msg)
        join.thread.start()
        return []

    def busy(self) -> bool:
        return any(not j.thread.is_alive() for j in self.joins.values())

    def poll(self) -> list[Message]:
        """A Result for every join that ended; joined groups become usable."""
        done: list[Message] = []
        for name, join in list(self.joins.items()):
            if join.thread.is_alive():
                continue
            del self.joins[name]
            rid = join.msg.request_id
            if join.groups:
                self.groups[name] = join.groups
                text = f"joined group {name} as rank {join.msg.rank_offset}"
                done.append(Result(request_id=rid, success=True, message=text))
            else:
                done.append(
                    Result(request_id=rid, success=False, message=f"InitWeightsGroup: {join.error}")
                )
        return done

    def destroy_group(self, name: str) -> bool:
        groups = self.groups.pop(name, None)
        for group in groups or []:
            group.destroy()
        return groups is not None

    def check(
        self, msg: UpdateWeightsFromDistributed, plan: BucketPlan | None, weights: base.WeightStore
    ) -> int:
        groups = self.groups.get(msg.group_name)
        if groups is None:
            raise ValueError(
                f"group_name {msg.group_name!r}: no such weights group (InitWeightsGroup first)"
            )
        if (msg.rows is not None) != (len(groups) > 1):
            raise ValueError(
                f"rows: group {msg.group_name!r} has {len(groups)} senders; an update to it "
                + ("must say which rows each sends" if len(groups) > 1 else "takes no rows")
            )
        if msg.rows is not None:
            if msg.delta is not None:
                raise ValueError("rows: a sharded update cannot carry delta payloads")
            if plan is not None:
                check_rows(plan, msg.rows, len(groups))
        return plan_total_bytes(plan) if plan is not None else 0

    def receive(
        self, msg: UpdateWeightsFromDistributed, plan: BucketPlan | None, writer: base.WeightWriter
    ) -> None:
        assert plan is not None
        groups = self.groups[msg.group_name]
        if msg.delta is not None:
            recv_payloads(
                groups[0],
                len(plan.buckets),
                lambda g, head, body: delta.apply_payload(g, plan.buckets[g], head, body, writer),
                max_body=max((b.nbytes for b in plan.buckets), default=0),
                timeout_s=msg.timeout_s,
                cancel=writer.cancel,
                first_timeout_s=2 * msg.timeout_s,
            )
            return
        # the pusher may wait timeout_s for other engines' accepts before it sends
        where = dict(region=writer.region, landed=writer.landed, cancel=writer.cancel)
        bounds = dict(verify=msg.verify, timeout_s=msg.timeout_s, first_timeout_s=2 * msg.timeout_s)
        if msg.rows is not None:  # a sharded trainer: every rank sends its own rows
            recv_rows(groups, plan, msg.rows, writer.on_bucket, **where, **bounds)
        else:
            recv_buckets(groups[0], plan, writer.on_bucket, **where, **bounds)

    def failed(self, msg: UpdateWeightsFromDistributed) -> None:
        self.destroy_group(msg.group_name)  # a failed collective leaves the group unusable

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)
