"""Sharded trainers (FSDP2) push their weights: every rank moves only its own shard's bytes.

Usage (every trainer rank, in lockstep; `store` is the store the ranks met at):
    pusher = ShardedPusher(sync_cfg, endpoints if rank == 0 else None, work_dir,
                           store=store, rank=rank, world_size=ws, method="shards")
    out = pusher.push(fsdp_policy, version)   # rank 0: the PushReport; others: a RankPush
    pusher.close()

Two methods:
- "shards" (ipc, CPU shared memory; `rlsync.transports.sharded.ipc`): rank 0 runs the normal `WeightPusher`
  (plan, ping the engines it gave up on, announce, collect accepts, commit; an engine that
  comes back gets the push in full, every rank writing its rows) with a sender that lets
  every rank write. A dim-0 shard of a row-major tensor is one contiguous byte range of the
  tensor's home (an engine's store when the engines publish their layout, else a slot of
  rank 0's staging buffer), so each rank writes its rows there itself, cast to the
  engine's dtype on the write. Rank 0 tells the engines bucket g is ready only once every rank reported its rows
  of g written (`rlsync.transports.sharded.channel`); a rank that does not report within `timeout_s` aborts the
  push for every engine, and the error names that rank. No rank holds a tensor it does not
  own, and the bytes of ranks > 0 never pass through rank 0. The engine side is unchanged:
  our engine and the vLLM backend (staging) receive as from one rank.
- "shards" over broadcast (`rlsync.transports.sharded.broadcast`): a weights group with one broadcast group per
  trainer rank, every rank broadcasting its own rows to the engines, which receive them in
  place in their stores (or stage them); rank 0 plans, announces and commits, the others
  follow its words.
- "gather": what RL frameworks do today and the fallback for other transports: every rank
  all-gathers each parameter (`DTensor.full_tensor()`), rank 0 keeps the full tensors and
  pushes them through the normal `WeightPusher`.
A single rank holds every row, so with world size 1 every method is a plain push of its local
tensors.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rlsync.config import SyncConfig
from rlsync.transports import TransportError
from rlsync.transports.sharded.broadcast import END, RowSender, ShardBroadcastSender
from rlsync.transports.sharded.channel import ShardChannel
from rlsync.transports.sharded.dim0 import full_tensors
from rlsync.transports.sharded.ipc import ShardIpcSender, ShardWriter
from trainer_side.sync.engine_set import PING_TIMEOUT_S
from trainer_side.sync.push_report import PushReport
from trainer_side.sync.pusher import WeightPusher, WeightsLike, named_tensors

PUSH_METHODS: tuple[str, ...] = ("shards", "gather")
SHARD_TRANSPORTS: tuple[str, ...] = ("ipc", "broadcast")
WORD_WAIT = 8
"""Ranks > 0 wait this many `timeout_s` (plus the ping of the engines rank 0 gave up on,
`PING_TIMEOUT_S`, before a push) for rank 0's next word of a broadcast push: between two
words it may ping, form a group, wait for accepts and for the engines' done, and retry."""


@dataclass
class RankPush:
    """What a rank > 0 did in one push."""

    rank: int
    method: str
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: bool = False
    """Rank 0 moved no bytes this push (it failed before the transfer)."""
    errors: list[str] = field(default_factory=list)
    """What failed on this rank (a send, a join, or rank 0 aborting the push while this rank
    was frozen or slow); it does not raise: rank 0's report says what the engines hold."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShardedPusher:
    """One trainer rank's part in pushing an FSDP2-sharded model (see the module docstring)."""

    def __init__(
        self,
        cfg: SyncConfig,
        endpoints: Mapping[str, str] | None,
        work_dir: str | Path,
        *,
        store: dist.Store,
        rank: int,
        world_size: int,
        method: str = "shards",
        device: str | torch.device = "cpu",
        connect_timeout_s: float = 60.0,
        auth_keys: str | Path | None = None,
    ):
        if method not in PUSH_METHODS:
            raise ValueError(f"method: {method!r} is not one of {list(PUSH_METHODS)}")
        if method == "shards" and cfg.transport not in SHARD_TRANSPORTS:
            raise ValueError(
                f"method 'shards' needs transport 'ipc' or 'broadcast', not {cfg.transport!r} "
                "(use 'gather')"
            )
        if method == "shards" and cfg.delta:  # the encoder compares whole tensors on rank 0
            raise ValueError("method 'shards' cannot send deltas (sync.delta): use 'gather'")
        self.cfg, self.rank, self.method = cfg, rank, method
        self.channel = ShardChannel(store, rank, world_size, cfg.timeout_s)
        self.pushes = 0
        self.pusher: WeightPusher | None = None
        self.writer: ShardWriter | None = None
        self.rows: RowSender | None = None
        self.single = world_size == 1
        """One rank holds every row: whatever the method, a plain push of its local tensors."""
        self.broadcast = method == "shards" and cfg.transport == "broadcast" and not self.single
        if rank == 0:
            if endpoints is None:
                raise ValueError("rank 0 needs the engines' endpoints")
            try:
                self.pusher = WeightPusher(
                    cfg,
                    endpoints,
                    work_dir,
                    device=device,
                    connect_timeout_s=connect_timeout_s,
                    auth_keys=auth_keys,
                    sender_class=self._sender_class(),
                )
            finally:
                if self.broadcast:  # push 0 (forming the group) is over, whatever happened
                    self.channel.say(0, END)
        elif self.broadcast:
            self.rows = RowSender(self.channel, torch.device(device))
            self.rows.follow(0, {}, WORD_WAIT * cfg.timeout_s + connect_timeout_s)
        elif method == "shards":
            self.writer = ShardWriter(self.channel)

    def _sender_class(self) -> Any:
        """Rank 0's sender (None: the transport's own, for gather and a single rank)."""
        if self.method != "shards" or self.single:
            return None
        cls = ShardBroadcastSender if self.broadcast else ShardIpcSender
        return functools.partial(cls, channel=self.channel)

    def push(self, weights: WeightsLike, version: int) -> PushReport | RankPush:
        """Every rank calls this with its (sharded) model; rank 0 returns the PushReport (and
        raises PushError as `WeightPusher.push` does), the others what they wrote."""
        self.pushes += 1
        tensors = named_tensors(weights)
        if self.single:
            assert self.pusher is not None
            local = {n: t.to_local() if isinstance(t, DTensor) else t for n, t in tensors.items()}
            return self.pusher.push(local, version)
        if self.method == "gather":
            return self._push_gathered(tensors, version)
        if self.rank != 0:
            return self._follow(tensors) if self.broadcast else self._write_rows(tensors)
        if self.broadcast:
            return self._push_rank0_broadcast(tensors, version)
        return self._push_rank0(tensors, version)

    def _follow(self, tensors: dict[str, torch.Tensor]) -> RankPush:
        assert self.rows is not None
        t0 = time.perf_counter()
        done = self.rows.follow(
            self.pushes, tensors, WORD_WAIT * self.cfg.timeout_s + PING_TIMEOUT_S
        )
        out = RankPush(rank=self.rank, method="shards", skipped=done.attempts == 0)
        out.bytes_written, out.seconds = done.bytes_sent, time.perf_counter() - t0
        out.errors = done.errors
        return out

    def _push_rank0_broadcast(self, tensors: dict[str, torch.Tensor], version: int) -> PushReport:
        assert self.pusher is not None
        sender = self.pusher.sender
        assert isinstance(sender, ShardBroadcastSender)
        sender.begin(self.pushes)
        try:
            return self.pusher.push(tensors, version)
        finally:
            sender.end()

    def _write_rows(self, tensors: dict[str, torch.Tensor]) -> RankPush:
        assert self.writer is not None
        t0 = time.perf_counter()
        # rank 0 pings the engines it gave up on, then announces: its engines may take
        # 2 x timeout_s to accept
        wait_s = 3 * self.cfg.timeout_s + PING_TIMEOUT_S
        out = RankPush(rank=self.rank, method="shards")
        try:
            written = self.writer.write(self.pushes, tensors, wait_s)
        except TransportError as exc:  # rank 0 gave up on this push (it was told why)
            written = 0
            out.errors.append(f"{type(exc).__name__}: {exc}")
        out.skipped = written is None
        out.bytes_written, out.seconds = written or 0, time.perf_counter() - t0
        return out

    def _push_rank0(self, tensors: dict[str, torch.Tensor], version: int) -> PushReport:
        assert self.pusher is not None
        n = self.pushes
        sender = self.pusher.sender
        assert isinstance(sender, ShardIpcSender)
        sender.push_n = n
        if n > 1:
            self.channel.forget(n - 1, len(self.pusher.plan.buckets) if self.pusher.plan else 0)
        try:
            return self.pusher.push(tensors, version)
        finally:
            if not self.channel.published(n):
                self.channel.publish(n, b"")  # the others must not wait for bytes never sent

    def _push_gathered(self, tensors: dict[str, torch.Tensor], version: int) -> Any:
        t0 = time.perf_counter()
        full = dict(full_tensors(tensors.items(), keep=self.rank == 0))
        if self.rank != 0:
            return RankPush(rank=self.rank, method="gather", seconds=time.perf_counter() - t0)
        assert self.pusher is not None
        return self.pusher.push(full, version)

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        if self.writer is not None:
            self.writer.close()
        if self.rows is not None:
            self.rows.close()
