"""The broadcast group itself: one rank's handle on a dedicated process group whose rank 0
sends, built from its own store rendezvous with every wait bounded, and the small helpers
every broadcast stream shares (`rlsync.transports.broadcast` for one sender,
`rlsync.transports.sharded.broadcast_rows` for the ranks of a sharded trainer)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, TCPStore

from rlsync.plan.buckets import dtype_name
from rlsync.transports import TransferStats, TransportError, TransportTimeout

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
    _buffers: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)

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
        (group,) = cls.join(
            master_address,
            master_port,
            {group_name: rank},
            world_size,
            members=world_size,
            host=rank == 0,
            backend=backend,
            timeout_s=timeout_s,
            device=device,
        )
        return group

    @classmethod
    def join(
        cls,
        master_address: str,
        master_port: int,
        ranks: Mapping[str, int],
        world_size: int,
        *,
        members: int,
        host: bool,
        backend: Backend = "gloo",
        timeout_s: float = 60.0,
        device: torch.device | str | None = None,
    ) -> list[BroadcastGroup]:
        """Meet `members` processes at one store (`host`: this one serves it), then connect
        to every group of `ranks` (group name -> this process' rank in it), in that order;
        each group has `world_size` ranks. A sharded trainer's weights group is one group
        per trainer rank over one store (`rlsync.transports.sharded.broadcast_rows`)."""
        if world_size < 2 or not all(0 <= r < world_size for r in ranks.values()):
            raise ValueError(
                f"ranks {dict(ranks)} / world_size {world_size}: need 0 <= rank < size"
            )
        dev = _device(backend, device)
        names = ", ".join(f"{n!r} rank {r}/{world_size}" for n, r in ranks.items())
        where = f"broadcast group {names}"
        try:
            store = TCPStore(
                master_address,
                master_port,
                members,
                host,
                timedelta(seconds=timeout_s),
                wait_for_workers=True,
            )
        except RuntimeError as e:
            raise _translate(e, f"{where}: rendezvous at {master_address}:{master_port}") from e
        groups: list[BroadcastGroup] = []
        try:
            for name, rank in ranks.items():
                link = (store, master_address, backend, dev, timeout_s)
                groups.append(cls._connect(link, name, rank, world_size))
                groups[-1].broadcast(torch.zeros(1, device=dev), timeout_s)  # all in; NCCL up
        except BaseException as e:
            for group in groups:
                group.destroy()
            if isinstance(e, RuntimeError) and not isinstance(e, TransportError):
                raise _translate(e, f"{where}: connect at {master_address}:{master_port}") from e
            raise
        return groups

    @classmethod
    def _connect(cls, link: tuple, name: str, rank: int, world_size: int) -> BroadcastGroup:
        """Group `name` over the store of `link` (store, master address, backend, device,
        timeout)."""
        store, master, backend, device, timeout_s = link
        pg = _make_backend(backend, PrefixStore(name, store), rank, world_size, timeout_s, master)
        return cls(
            rank=rank,
            world_size=world_size,
            backend=backend,
            group_name=name,
            device=device,
            timeout_s=timeout_s,
            _pg=pg,
            _store=store,
        )

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

    def buffers(self, nbytes: int, role: str = "wire") -> list[torch.Tensor]:
        """Two reusable uint8 buffers of >= nbytes on the group's device (pre-faulted), one
        pair per `role` (what they hold: "wire" bytes, or "stage"d buckets)."""
        pair = self._buffers.get(role)
        if pair is None or pair[0].numel() < nbytes:
            self._buffers.pop(role, None)  # free the old pair before allocating the new one
            pair = self._buffers[role] = [
                torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)
            ]
        return pair

    def destroy(self) -> None:
        """Tear the group down (safe after errors, idempotent); the port is released."""
        pg, self._pg, self._store, self._buffers = self._pg, None, None, {}
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


IN_FLIGHT = 16
"""Broadcasts kept in flight for a plan that follows the engines' store: its buckets need no
staging buffer on either side (bar the packed ones, two at a time), and a deeper queue hides
the per-collective latency of many tensor-sized buckets."""


def as_wire(
    src: torch.Tensor, dtype: str, nbytes: int, device: torch.device
) -> torch.Tensor | None:
    """`src`'s bytes exactly as the wire carries them, with no packing copy, when it already
    has the planned `dtype`, is contiguous on the group's device and is `nbytes` long; else
    None (it must be packed)."""
    if dtype_name(src.dtype) != dtype or not src.is_contiguous() or src.device != device:
        return None
    if src.numel() * src.element_size() != nbytes:
        return None
    return src.detach().reshape(-1).view(torch.uint8)


def holds(inflight: deque[tuple[Any, ...]], slot: int | None) -> bool:
    """Whether a broadcast in flight still reads packing buffer `slot` (None: needs none)."""
    return slot is not None and any(k == slot for *_, k in inflight)


def finish(
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
