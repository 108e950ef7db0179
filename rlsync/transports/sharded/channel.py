"""How the trainer ranks of a sharded push tell each other where they are: keys in the
TCPStore the ranks already met at (the default process group's store).

Push n (every rank counts its pushes; they push in lockstep):
    rank 0:   go(n) = the encoded UpdateWeightsFromIPC (buffer, plan, push id), or b"" when
              nothing is to be written (the push failed before any byte moved)
    rank r:   wait go(n) -> for each bucket g: write its rows -> wrote(n, r, g)
    rank 0:   publishes bucket g to the engines only after wrote(n, r, g) of every rank r
Over broadcast (`rlsync.transports.sharded.broadcast`) rank 0 says words instead, w0, w1, ... of push n (push 0:
the pusher's construction), each a protocol frame the other ranks follow in order: an
InitWeightsGroup (join the new weights group), an UpdateWeightsFromDistributed (send your
rows; attempt `n.i`, progress `wrote("n.i", r, g)`), or b"" (the push is over).
Every wait is bounded; a rank whose key does not come in time is named in the error. Values
are msgpack frames of `rlsync.wire.protocol` messages or plain markers, never pickle.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from rlsync.transports import TransportError, TransportTimeout

PREFIX = "rlsync-shards"


class ShardChannel:
    """Per-push keys of one sharded pusher in a store shared by all trainer ranks."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float):
        self.store = dist.PrefixStore(PREFIX, store)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.words: dict[int, int] = {}
        """push -> the index of the last word rank 0 said in it"""

    def publish(self, n: int, payload: bytes) -> None:
        """Rank 0: what push n writes (b"": nothing)."""
        self.store.set(f"{n}/go", payload)

    def published(self, n: int) -> bool:
        return self.store.check([f"{n}/go"])

    def wait_go(self, n: int, timeout_s: float) -> bytes:
        """Ranks > 0: rank 0's word on push n."""
        self._wait(f"{n}/go", timeout_s, f"trainer rank 0 did not start push {n}")
        return bytes(self.store.get(f"{n}/go"))

    def say(self, n: int, word: bytes) -> str:
        """Rank 0: the next word of push n; returns its key."""
        i = self.words[n] = self.words.get(n, -1) + 1
        self.store.set(f"{n}/w{i}", word)
        return f"{n}/w{i}"

    def hear(self, n: int, i: int, timeout_s: float) -> bytes:
        """Ranks > 0: word i of push n."""
        self._wait(f"{n}/w{i}", timeout_s, f"trainer rank 0 said nothing more of push {n}")
        return bytes(self.store.get(f"{n}/w{i}"))

    def wrote(self, n: int | str, g: int, failure: str = "") -> None:
        """This rank's rows of bucket g of push (attempt) n are where they go (or failed)."""
        self.store.set(f"{n}/r{self.rank}/b{g}", failure.encode() if failure else b"1")

    def wait_wrote(self, n: int | str, g: int, timeout_s: float) -> None:
        """Rank 0: until every other rank wrote bucket g; names the first rank that did not,
        or that failed."""
        for r in range(1, self.world_size):
            key = f"{n}/r{r}/b{g}"
            self._wait(
                key,
                timeout_s,
                f"trainer rank {r} did not write its shard of bucket {g} within {timeout_s:.1f}s",
            )
            value = bytes(self.store.get(key))
            if value != b"1":
                raise TransportError(f"trainer rank {r}, bucket {g}: {value.decode()[:500]}")

    def forget_keys(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete_key(key)

    def forget(self, n: int, buckets: int) -> None:
        """Rank 0: drop the keys of push n (every rank is past it or gave up)."""
        self.forget_keys(
            [f"{n}/go"]
            + [f"{n}/r{r}/b{g}" for r in range(1, self.world_size) for g in range(buckets)]
        )

    def _wait(self, key: str, timeout_s: float, what: str) -> None:
        try:
            self.store.wait([key], timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistError) as exc:
            raise TransportTimeout(f"{what} ({type(exc).__name__})") from None
