"""Broadcast transport: a dedicated weights group (trainer = rank 0, engines = ranks 1..N).

The group is built from its own TCPStore rendezvous (hosted by rank 0, keys under a
`group_name` prefix) and the backend is constructed directly - gloo on CPU, NCCL on CUDA,
same code - so it is never registered as torch.distributed's default group and lives beside
a trainer's own DDP/FSDP group. Every wait is bounded: the rendezvous, each broadcast (the
op's own timeout plus a bounded `Work.wait`), and a peer that dies breaks the connection
and raises at once. After any error, `destroy()` the group and create a fresh one (on a new
port); the process keeps running.

Pushes are double-buffered: the sender packs bucket g+1 into the second buffer while
bucket g is on the wire, and a receiver posts the receive of bucket g+1 before loading g.
The two buffers are allocated once per group (grown if a plan needs more) and reused.

NCCL note: a collective that outlives the group timeout trips NCCL's watchdog, whose
default reaction (TORCH_NCCL_ASYNC_ERROR_HANDLING) may end the process; engines that must
survive a dead trainer should set that variable to 2 (abort the communicator only).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, TCPStore

from rlsync.buckets import dtype_name, fingerprint, in_store, pack_bucket, plan_total_bytes
from rlsync.netutil import free_port
from rlsync.protocol import (
    Bucket,
    BucketPlan,
    DestroyWeightsGroup,
    InitWeightsGroup,
    Message,
    Result,
    UpdateWeightsFromDistributed,
    failed,
)
from rlsync.transports import (
    OnBucket,
    TransferStats,
    TransportError,
    TransportTimeout,
    base,
    integrity,
)

Backend = Literal["gloo", "nccl"]
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True, eq=False)
class BroadcastGroup:
    """One rank's handle on a dedicated broadcast group (rank 0 sends)."""

    rank: int
    world_size: int
    backend: Backend
    group_name: str
    device: torch.device
    timeout_s: float
    _pg: Any = field(repr=False)
    _store: Any = field(repr=False)
    _buffers: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def create(
        cls,
        master_address: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: Backend = "gloo",
        timeout_s: float = 60.0,
        group_name: str = "weights",
        device: torch.device | str | None = None,
    ) -> BroadcastGroup:
        """Rendezvous at master_address:master_port (rank 0 hosts the store) and connect.

        Returns once every rank has joined; raises TransportTimeout when a peer does not show
        up within `timeout_s`.
        """
        if not 0 <= rank < world_size or world_size < 2:
            raise ValueError(
                f"rank {rank} / world_size {world_size}: need 0 <= rank < size, size >= 2"
            )
        where = f"broadcast group {group_name!r} rank {rank}/{world_size}"
        dev = _device(backend, device)
        try:
            store = TCPStore(
                master_address,
                master_port,
                world_size,
                rank == 0,
                timedelta(seconds=timeout_s),
                wait_for_workers=True,
            )
            prefixed = PrefixStore(group_name, store)
            pg = _make_backend(backend, prefixed, rank, world_size, timeout_s, master_address)
        except RuntimeError as e:
            raise _translate(e, f"{where}: rendezvous at {master_address}:{master_port}") from e
        group = cls(
            rank=rank,
            world_size=world_size,
            backend=backend,
            group_name=group_name,
            device=dev,
            timeout_s=timeout_s,
            _pg=pg,
            _store=store,
        )
        try:
            group.broadcast(torch.zeros(1, device=dev), timeout_s)  # all ranks in; NCCL is up
        except BaseException:
            group.destroy()
            raise
        return group

    def broadcast_async(self, tensor: torch.Tensor, timeout_s: float | None = None) -> Any:
        """Start a broadcast from rank 0 into `tensor` on every rank; returns the work handle."""
        if self._pg is None:
            raise TransportError(f"broadcast group {self.group_name!r}: used after destroy()")
        timeout = timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)
        try:
            return self._pg.broadcast(tensor, 0, timeout)
        except RuntimeError as e:
            raise _translate(e, self._where("broadcast")) from e

    def wait(self, work: Any, timeout_s: float | None = None, what: str = "broadcast") -> None:
        """Block until `work` is done, at most `timeout_s` (raises TransportTimeout/Error)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            done = work.wait(timedelta(seconds=timeout))
        except RuntimeError as e:
            raise _translate(e, self._where(what)) from e
        if done is False:
            raise TransportTimeout(f"{self._where(what)}: not done after {timeout:.1f}s")

    def broadcast(self, tensor: torch.Tensor, timeout_s: float | None = None) -> None:
        """Broadcast from rank 0 into `tensor` on every rank and wait for it."""
        self.wait(self.broadcast_async(tensor, timeout_s), timeout_s)

    def buffers(self, nbytes: int) -> list[torch.Tensor]:
        """Two reusable uint8 buffers of >= nbytes on the group's device (pre-faulted)."""
        if not self._buffers or self._buffers[0].numel() < nbytes:
            self._buffers = []  # free the old pair before allocating the new one
            self._buffers = [
                torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]
        return self._buffers

    def destroy(self) -> None:
        """Tear the group down (safe after errors, idempotent); the port is released."""
        pg, self._pg, self._store, self._buffers = self._pg, None, None, []
        if pg is not None:
            try:
                pg.abort() if self.backend == "nccl" else pg.shutdown()
            except RuntimeError:
                pass  # already broken: dropping the last reference releases it

    def _where(self, what: str) -> str:
        return f"broadcast group {self.group_name!r} rank {self.rank}/{self.world_size}: {what}"


def _device(backend: Backend, device: torch.device | str | None) -> torch.device:
    if backend == "gloo":
        return torch.device(device or "cpu")
    if backend == "nccl":
        return (
            torch.device(device)
            if device is not None
            else torch.device("cuda", torch.cuda.current_device())
        )
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _make_backend(
    backend: Backend, store: Any, rank: int, size: int, timeout_s: float, master_address: str
) -> Any:
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = ProcessGroupGloo._Options()
        opts._timeout = timeout
        local = master_address in _LOOPBACK
        opts._devices = [
            ProcessGroupGloo.create_device(hostname="127.0.0.1")
            if local
            else ProcessGroupGloo.create_default_device()
        ]
        return ProcessGroupGloo(store, rank, size, opts)
    from torch.distributed import ProcessGroupNCCL  # absent from CPU-only builds

    opts = ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return ProcessGroupNCCL(store, rank, size, opts)


def _translate(e: Exception, where: str) -> TransportError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    return (TransportTimeout if timed_out else TransportError)(f"{where}: {text}")


def _wire_bytes(plan: BucketPlan, verify: bool) -> int:
    return max((integrity.wire_bytes(b.nbytes, verify) for b in plan.buckets), default=0)


def send_buckets(
    group: BroadcastGroup,
    plan: BucketPlan,
    tensors: Mapping[str, torch.Tensor],
    *,
    verify: bool = False,
    timeout_s: float = 60.0,
) -> TransferStats:
    """Rank 0: broadcast every bucket of `plan`, packing bucket g+1 while g is in flight.
    Buckets of a plan that follows the engines' store (`in_store`) land there in place on
    every engine, so their verify trailer travels as a broadcast of its own."""
    if group.rank != 0:
        raise TransportError(f"send_buckets on rank {group.rank}: only rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
    bufs = group.buffers(_wire_bytes(plan, verify))
    apart = in_store(plan)
    trailers = [
        torch.zeros(integrity.TRAILER_BYTES, dtype=torch.uint8, device=group.device) for _ in (0, 1)
    ]
    inflight: list[list[Any]] = [[], []]
    for g, bucket in enumerate(plan.buckets):
        k = g % 2
        _finish(group, inflight[k], timeout_s, f"bucket {g - 2}", stats)  # frees buffer k
        t = time.perf_counter()
        solo = sent_as_is(bucket, tensors, group.device) if apart else None
        if solo is not None:  # the trainer's own bytes go out: nothing to pack
            parts = [solo]
            if verify:
                parts.append(trailers[k])
                trailers[k].copy_(fingerprint(solo).reshape(1).view(torch.uint8))
        else:
            buf = bufs[k][: integrity.wire_bytes(bucket.nbytes, verify)]
            pack_bucket(bucket, tensors, buf)
            if verify:
                integrity.seal(g, buf, bucket.nbytes)
            parts = [buf[: bucket.nbytes], buf[bucket.nbytes :]] if apart and verify else [buf]
        stats.add("pack", time.perf_counter() - t)
        inflight[k] = [group.broadcast_async(part, timeout_s) for part in parts]
    n = len(plan.buckets)
    for g in (n - 2, n - 1):
        if g >= 0:
            _finish(group, inflight[g % 2], timeout_s, f"bucket {g}", stats)
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
    if (
        spec.offset
        or spec.nbytes != bucket.nbytes
        or dtype_name(src.dtype) != spec.dtype
        or tuple(src.shape) != tuple(spec.shape)
        or not src.is_contiguous()
        or src.device != device
    ):
        return None
    return src.detach().reshape(-1).view(torch.uint8)


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
    """Ranks > 0: receive every bucket of `plan`; the receive of bucket g+1 is posted before
    bucket g is handled. A bucket for which `region` gives the bytes of the store it belongs
    to is received there in place and reported to `landed`; any other is received into a
    staging buffer and handed to `on_bucket` to copy. A set `cancel` stops it between
    buckets (a receive already posted still completes or times out, but nothing more is
    posted). The first two receives, posted before rank 0 may have started, wait
    `first_timeout_s`."""
    if group.rank == 0:
        raise TransportError("recv_buckets on rank 0: rank 0 sends")
    t0 = time.perf_counter()
    stats = TransferStats(nbytes=plan_total_bytes(plan), buckets=len(plan.buckets))
    bufs = group.buffers(_wire_bytes(plan, verify))
    first = timeout_s if first_timeout_s is None else first_timeout_s
    slots = _RecvSlots(group, plan, bufs, region, verify)
    pending = slots.post(0, first, cancel) if plan.buckets else None
    for g, bucket in enumerate(plan.buckets):
        wait_s = first if g == 0 else timeout_s
        following = slots.post(g + 1, wait_s, cancel) if g + 1 < len(plan.buckets) else None
        _finish(group, pending, wait_s, f"bucket {g}", stats)
        _check_cancel(cancel, g)
        t = time.perf_counter()
        target, trailer, in_place = slots.placed.pop(g)
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
        pending = following
    stats.seconds = time.perf_counter() - t0
    return stats


class _RecvSlots:
    """Where each bucket of one receive lands: its range of the store (in place), or staging
    buffer g % 2; with verify, where its trailer lands."""

    def __init__(
        self,
        group: BroadcastGroup,
        plan: BucketPlan,
        bufs: list[torch.Tensor],
        region: Callable[[Bucket], torch.Tensor | None] | None,
        verify: bool,
    ):
        self.group, self.plan, self.bufs, self.region = group, plan, bufs, region
        self.verify = verify
        self.placed: dict[int, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}
        """bucket -> (where its bytes land, where its trailer lands, in place)"""
        self._trailers = [torch.zeros(integrity.TRAILER_BYTES, dtype=torch.uint8) for _ in (0, 1)]

    def post(self, g: int, timeout_s: float, cancel: threading.Event | None) -> list[Any]:
        """Post the receive(s) of bucket g; returns their work handles."""
        _check_cancel(cancel, g)
        bucket = self.plan.buckets[g]
        store = self.region(bucket) if self.region is not None else None
        if store is not None:
            trailer = self._trailers[g % 2].to(store.device) if self.verify else None
            self.placed[g] = (store, trailer, True)
            parts = [store] + ([trailer] if trailer is not None else [])
        else:
            wire = self.bufs[g % 2][: integrity.wire_bytes(bucket.nbytes, self.verify)]
            trailer = wire[bucket.nbytes :] if self.verify else None
            self.placed[g] = (wire, trailer, False)
            parts = [wire]
        return [self.group.broadcast_async(part, timeout_s) for part in parts]


def _check_cancel(cancel: threading.Event | None, g: int) -> None:
    if cancel is not None and cancel.is_set():
        raise base.Cancelled(f"broadcast receive cancelled before bucket {g}")


def _finish(
    group: BroadcastGroup,
    works: list[Any] | None,
    timeout_s: float,
    what: str,
    stats: TransferStats,
) -> None:
    t = time.perf_counter()
    for work in works or []:
        group.wait(work, timeout_s, what)
    stats.add("wait", time.perf_counter() - t)


# ---------------------------------------------------------------- the two halves


class Sender(base.Sender):
    """Trainer half: rank 0 of a dedicated group whose ranks 1..N are the live engines."""

    kind = "broadcast"
    can_rebuild = True
    solo_bytes = 1 << 20  # sent straight from the trainer's tensor, no packing copy

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.group: BroadcastGroup | None = None
        self.group_name = ""
        self.members: list[str] = []
        self._form(self.engines.live())

    def _form(self, names: list[str]) -> None:
        """Rendezvous: every engine joins from its loop while rank 0 joins here; all bounded."""
        cfg = self.cfg
        backend = (
            cfg.backend
            if cfg.backend != "auto"
            else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        port, world = free_port(cfg.master_address), len(names) + 1
        self.group_name = f"weights-{uuid.uuid4().hex[:8]}"
        rids = self.engines.send(
            {
                n: InitWeightsGroup(
                    master_address=cfg.master_address,
                    master_port=port,
                    rank_offset=i + 1,
                    world_size=world,
                    group_name=self.group_name,
                    backend=backend,
                    timeout_s=cfg.timeout_s,
                )
                for i, n in enumerate(names)
            }
        )
        self.group = BroadcastGroup.create(
            master_address=cfg.master_address,
            master_port=port,
            rank=0,
            world_size=world,
            backend=backend,
            timeout_s=cfg.timeout_s,
            group_name=self.group_name,
        )
        replies = self.engines.gather(rids, cfg.timeout_s)
        refused = {n: why for n, r in replies.items() if (why := failed(r)) is not None}
        if refused:
            self.group.destroy()
            raise TransportError(f"weights group rendezvous failed: {refused}")
        self.members = names

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromDistributed:
        return UpdateWeightsFromDistributed(
            group_name=self.group_name, plan=update.plan, plan_id=update.plan_id, **update.fields
        )

    def send(self, plan: BucketPlan, tensors: base.Tensors, accepted: list[str]) -> None:
        if sorted(accepted) != sorted(self.members):
            refused = sorted(set(self.members) - set(accepted))
            raise TransportError(
                f"engines {refused} refused the update; a broadcast needs every member"
            )
        assert self.group is not None
        send_buckets(
            self.group, plan, tensors, verify=self.cfg.verify, timeout_s=self.cfg.timeout_s
        )

    def rebuild(self) -> None:
        self._dissolve()
        self._form(self.engines.live())

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
    """One engine's rendezvous with a group, on its own thread (rank 0 may be late)."""

    def __init__(self, msg: InitWeightsGroup):
        self.msg, self.group, self.error = msg, None, ""
        self.thread = threading.Thread(target=self._run, name=f"join-{msg.group_name}", daemon=True)

    def _run(self) -> None:
        msg = self.msg
        try:
            self.group = BroadcastGroup.create(
                master_address=msg.master_address,
                master_port=msg.master_port,
                rank=msg.rank_offset,
                world_size=msg.world_size,
                backend=msg.backend,
                timeout_s=msg.timeout_s,
                group_name=msg.group_name,
            )
        except Exception as exc:  # reported in the Result; the engine loop goes on
            self.error = f"{type(exc).__name__}: {exc}"


class Receiver(base.Receiver):
    """Engine half: the groups this engine joined, by name. A join waits for rank 0 on a
    worker thread (up to its timeout) while the engine loop keeps answering."""

    kind = "broadcast"
    control_messages = (InitWeightsGroup, DestroyWeightsGroup)

    def __init__(self) -> None:
        self.groups: dict[str, BroadcastGroup] = {}
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
            if join.group is not None:
                self.groups[name] = join.group
                text = f"joined group {name} as rank {join.msg.rank_offset}"
                done.append(Result(request_id=rid, success=True, message=text))
            else:
                done.append(
                    Result(request_id=rid, success=False, message=f"InitWeightsGroup: {join.error}")
                )
        return done

    def destroy_group(self, name: str) -> bool:
        group = self.groups.pop(name, None)
        if group is not None:
            group.destroy()
        return group is not None

    def check(
        self, msg: UpdateWeightsFromDistributed, plan: BucketPlan | None, weights: base.WeightStore
    ) -> int:
        if msg.group_name not in self.groups:
            raise ValueError(
                f"group_name {msg.group_name!r}: no such weights group (InitWeightsGroup first)"
            )
        return plan_total_bytes(plan) if plan is not None else 0

    def receive(
        self, msg: UpdateWeightsFromDistributed, plan: BucketPlan | None, writer: base.WeightWriter
    ) -> None:
        assert plan is not None
        # the pusher may wait timeout_s for other engines' accepts before it sends
        recv_buckets(
            self.groups[msg.group_name],
            plan,
            writer.on_bucket,
            region=writer.region,
            landed=writer.landed,
            verify=msg.verify,
            timeout_s=msg.timeout_s,
            cancel=writer.cancel,
            first_timeout_s=2 * msg.timeout_s,
        )

    def failed(self, msg: UpdateWeightsFromDistributed) -> None:
        self.destroy_group(msg.group_name)  # a failed collective leaves the group unusable

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)
