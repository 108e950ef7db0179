"""Trainer ranks of a sharded (FSDP2) push for the freeze tests, as spawned processes in a
gloo group over a TCPStore the test hosts. Every rank loads the policy, shards it with
`fully_shard` and pushes the given versions through `ShardedPusher`, each push only once
the test sets `freeze/go<i>`; each rank sets `freeze/result<i>/r<rank>` (JSON) after it.
A push that raises anything but PushError is recorded as `error` and the next push goes
on (a training loop that logs a failed push). The rank named `stop_rank` stops itself (SIGSTOP) right after it reported its rows of
bucket 0 of the first push written; the test thaws it.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlsync.config import SyncConfig
from tests.e2e.sync_helpers import trainer_weights

KEY_WAIT_S = 120.0


class ShardRun:
    """`world_size` trainer ranks pushing `versions` to `endpoints`, driven by the test."""

    def __init__(
        self,
        world_size: int,
        ckpt: Path,
        endpoints: dict[str, str],
        sync: SyncConfig,
        out: Path,
        versions: list[int],
        stop_rank: int | None = None,
    ):
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        args = (world_size, self.store.port, str(ckpt), endpoints, asdict(sync), str(out))
        self.procs = [
            ctx.Process(target=rank_main, args=(r, *args, versions, stop_rank))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def pid(self, rank: int) -> int:
        pid = self.procs[rank].pid
        assert pid is not None
        return pid

    def wait_ready(self, timeout_s: float) -> None:
        """Until every rank has built its pusher (engines found, groups formed)."""
        keys = [f"freeze/ready/r{r}" for r in range(len(self.procs))]
        self.store.wait(keys, timedelta(seconds=timeout_s))

    def go(self, i: int) -> None:
        self.store.set(f"freeze/go{i}", b"1")

    def result(self, i: int, rank: int, timeout_s: float) -> dict[str, Any]:
        key = f"freeze/result{i}/r{rank}"
        try:
            self.store.wait([key], timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistError):
            alive = [p.is_alive() for p in self.procs]
            raise AssertionError(
                f"rank {rank}: no result of push {i} in {timeout_s:.0f}s; alive {alive}"
            ) from None
        return json.loads(bytes(self.store.get(key)))

    def close(self) -> None:
        """Ranks past their last push exit at once; one still waiting (a failed case) is
        killed after a short grace."""
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(10)


def rank_main(
    rank: int,
    world_size: int,
    port: int,
    ckpt: str,
    endpoints: dict[str, str],
    sync: dict[str, Any],
    out: str,
    versions: list[int],
    stop_rank: int | None,
) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    try:
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size
        )
        if rank == stop_rank:
            _stop_after_bucket_0()
        _push_all(rank, world_size, store, Path(ckpt), endpoints, SyncConfig(**sync), out, versions)
    except Exception as exc:  # every remaining result says why
        why = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        for i in range(1, len(versions) + 1):
            if not store.check([f"freeze/result{i}/r{rank}"]):
                store.set(f"freeze/result{i}/r{rank}", json.dumps(why))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _push_all(
    rank: int,
    world_size: int,
    store: dist.Store,
    ckpt: Path,
    endpoints: dict[str, str],
    sync: SyncConfig,
    out: str,
    versions: list[int],
) -> None:
    from trainer_side.rl.fsdp import shard_policy
    from trainer_side.rl.policy import LlamaPolicy
    from trainer_side.sync.push_report import PushError
    from trainer_side.sync.shard_push import ShardedPusher

    policy = LlamaPolicy.from_pretrained(ckpt)
    shard_policy(policy, world_size, "cpu")
    pusher = ShardedPusher(
        sync,
        endpoints if rank == 0 else None,
        Path(out) / "sync",
        store=store,
        rank=rank,
        world_size=world_size,
        connect_timeout_s=20,
    )
    store.set(f"freeze/ready/r{rank}", b"1")
    try:
        for i, version in enumerate(versions, 1):
            store.wait([f"freeze/go{i}"], timedelta(seconds=KEY_WAIT_S))
            _set_weights(policy, trainer_weights(ckpt, version), rank)
            start = time.monotonic()
            try:
                result = pusher.push(policy, version).to_dict()
            except PushError as exc:
                report = exc.report.to_dict() if exc.report is not None else {}
                result = {**report, "push_error": str(exc)}
            except Exception as exc:  # not what push documents: recorded, and the loop goes on
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            result["seconds"] = time.monotonic() - start
            store.set(f"freeze/result{i}/r{rank}", json.dumps(result, default=str))
    finally:
        pusher.close()


def _set_weights(policy: torch.nn.Module, tensors: dict[str, torch.Tensor], rank: int) -> None:
    """Each rank copies its own rows of the full tensors into its shards."""
    from rlsync.transports.sharded.dim0 import dim0_shard

    with torch.no_grad():
        for name, p in policy.named_parameters():
            shard = dim0_shard(p, rank)
            if shard is not None:
                shard.local.copy_(tensors[name][shard.start : shard.start + shard.rows])


def _stop_after_bucket_0() -> None:
    """This rank stops itself once it reported its rows of bucket 0 of its first push."""
    from rlsync.transports.sharded.channel import ShardChannel

    wrote, done = ShardChannel.wrote, []

    def wrote_then_stop(self: ShardChannel, n: int | str, g: int, failure: str = "") -> None:
        wrote(self, n, g, failure)
        if g == 0 and not done:
            done.append(n)
            os.kill(os.getpid(), signal.SIGSTOP)

    ShardChannel.wrote = wrote_then_stop  # type: ignore[method-assign]
