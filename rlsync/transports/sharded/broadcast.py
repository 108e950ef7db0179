"""The broadcast transport for sharded trainers: every rank broadcasts its own rows.

The weights group is one broadcast group per trainer rank, each with every engine in it
(`rlsync.transports.sharded.broadcast_rows`): rank r sends its rows of every tensor over its own
group, so its bytes go straight to the engines, and no trainer rank receives anything.
Rank 0 runs the broadcast protocol of one rank (`WeightPusher`: plan, announce, accepts,
commit, rebuild around dead engines) with `ShardBroadcastSender`; the other ranks follow
its words in the trainer ranks' store (`rlsync.transports.sharded.channel`) with a `RowSender`: join the group
rank 0 formed, send your rows of this plan, the push is over. Rank 0 waits for every
rank's rows of every bucket (each rank reports bucket by bucket) and names a rank that
fails or does not report within `timeout_s`. CPU (gloo) only for now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rlsync.transports import TransportError, base, broadcast
from rlsync.transports.broadcast_group import BroadcastGroup
from rlsync.transports.sharded.broadcast_rows import send_rows, sender_group
from rlsync.transports.sharded.channel import ShardChannel
from rlsync.transports.sharded.dim0 import local_rows, row_splits
from rlsync.wire import codec
from rlsync.wire.protocol import InitWeightsGroup, UpdateWeightsFromDistributed

END = b""
"""The word that ends a push."""


def join_as_sender(init: InitWeightsGroup, rank: int, device: torch.device) -> BroadcastGroup:
    """Trainer rank `rank`'s own group of the sharded weights group `init` describes (rank
    0 serves the store the trainer ranks and engines meet at)."""
    (group,) = BroadcastGroup.join(
        init.master_address,
        init.master_port,
        {sender_group(init.group_name, rank): 0},
        init.world_size,
        members=init.world_size + init.senders - 1,
        host=rank == 0,
        backend=init.backend,
        timeout_s=init.timeout_s,
        device=device,
    )
    return group


class ShardBroadcastSender(broadcast.Sender):
    """Rank 0's broadcast sender in a sharded push: the group has a sender per trainer rank,
    every update says which rows each sends, and `send` sends rank 0's rows, then waits for
    every other rank's. Each thing the other ranks must do is said as a word of the push
    (`begin` starts a push, `end` ends it)."""

    def __init__(self, *args: Any, channel: ShardChannel):
        if args[3].type != "cpu":
            raise TransportError("sharded broadcast push: gloo on CPU only (use method gather)")
        self.channel, self.senders = channel, channel.world_size
        self.push_n = 0
        self.keys: dict[int, list[str]] = {}
        """push -> the progress keys of its attempts (dropped two pushes later, with its words)"""
        self.rows: dict[str, list[int]] = {}
        super().__init__(*args)

    def begin(self, n: int) -> None:
        """Push n starts; the keys of push n - 2 go (every rank is past it by now)."""
        said = self.channel.words.pop(n - 2, -1) + 1
        self.channel.forget_keys(self.keys.pop(n - 2, []) + [f"{n - 2}/w{i}" for i in range(said)])
        self.push_n = n

    def end(self) -> None:
        self._say(END)

    def _say(self, word: bytes) -> str:
        return self.channel.say(self.push_n, word)

    def _join(self, init: InitWeightsGroup) -> BroadcastGroup:
        self._say(codec.encode(init))  # the other ranks join as rank 0 knows it does
        return join_as_sender(init, 0, self.device)

    def prepare(self, plan: Any, tensors: base.Tensors, version: int, kind: base.PushKind) -> None:
        self.rows = {name: row_splits(t, self.senders) for name, t in tensors.items()}

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromDistributed:
        msg = super().announce(engine, update)
        msg.rows = self.rows
        return msg

    def send(self, plan: Any, tensors: base.Tensors, accepted: list[str]) -> None:
        self._check_accepted(accepted)
        assert self.group is not None
        go = UpdateWeightsFromDistributed(
            group_name=self.group_name,
            plan=plan,
            rows=self.rows,
            verify=self.cfg.verify,
            timeout_s=self.cfg.timeout_s,
        )
        attempt = self._say(codec.encode(go)).replace("/w", ".")  # "n.i": word i of push n
        self.keys.setdefault(self.push_n, []).extend(
            f"{attempt}/r{r}/b{g}" for r in range(1, self.senders) for g in range(len(plan.buckets))
        )
        mine: Exception | None = None
        try:
            local = local_rows(tensors, self.rows, 0)
            send_rows(
                self.group,
                plan,
                self.rows,
                0,
                local,
                verify=self.cfg.verify,
                timeout_s=self.cfg.timeout_s,
            )
        except Exception as exc:  # the other ranks' part still ends before this push does
            mine = exc
        for g in range(len(plan.buckets)):  # a rank that failed or died is named first
            self.channel.wait_wrote(attempt, g, self.cfg.timeout_s)
        if mine is not None:
            raise mine


@dataclass
class Followed:
    """What a rank > 0 did in one push: bytes it sent, attempts, and what failed."""

    bytes_sent: int = 0
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


class RowSender:
    """A rank > 0 of a sharded broadcast push: follows rank 0's words, keeps its place in
    the current weights group, and sends its rows when told to."""

    def __init__(self, channel: ShardChannel, device: torch.device):
        self.channel, self.device = channel, device
        self.group: BroadcastGroup | None = None

    def follow(self, n: int, tensors: Mapping[str, torch.Tensor], wait_s: float) -> Followed:
        """Do what rank 0 says in push n until it says the push is over."""
        out, i = Followed(), 0
        while (word := self.channel.hear(n, i, wait_s)) != END:
            msg = codec.decode(word)
            if isinstance(msg, InitWeightsGroup):
                self._join(msg, out)
            elif isinstance(msg, UpdateWeightsFromDistributed):
                out.attempts += 1
                self._send(f"{n}.{i}", msg, tensors, out)
            else:
                raise TransportError(f"push {n}: rank 0 said {type(msg).__name__}")
            i += 1
        return out

    def _join(self, init: InitWeightsGroup, out: Followed) -> None:
        self.close()
        try:
            self.group = join_as_sender(init, self.channel.rank, self.device)
        except Exception as exc:  # rank 0's rendezvous fails too; it forms a new group later
            out.errors.append(f"join {init.group_name}: {exc}")

    def _send(
        self,
        attempt: str,
        msg: UpdateWeightsFromDistributed,
        tensors: Mapping[str, torch.Tensor],
        out: Followed,
    ) -> None:
        plan, rows = msg.plan, msg.rows
        assert plan is not None and rows is not None
        sent: list[int] = []
        try:
            if self.group is None:
                raise TransportError("not in the weights group (its rendezvous failed)")
            stats = send_rows(
                self.group,
                plan,
                rows,
                self.channel.rank,
                local_rows(tensors, rows, self.channel.rank),
                verify=msg.verify,
                timeout_s=msg.timeout_s,
                on_sent=lambda g: (sent.append(g), self.channel.wrote(attempt, g)),
            )
            out.bytes_sent += stats.nbytes
        except Exception as exc:  # reported to rank 0 on every bucket not yet sent
            why = f"{type(exc).__name__}: {exc}"
            out.errors.append(why)
            for g in range(len(sent), len(plan.buckets)):
                self.channel.wrote(attempt, g, why)

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
