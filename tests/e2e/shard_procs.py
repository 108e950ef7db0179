"""Trainer ranks of a sharded push, as real processes: a gloo group over a TCPStore the test
hosts, the policy loaded from a checkpoint, set to a version's weights, sharded with FSDP2,
and pushed by `ShardedPusher`. Each rank writes what it got to `out/rank{r}.json`.

`run_ranks` starts them (spawn) and joins them; `kill_after_bucket` makes a rank SIGKILL
itself right after it reported its rows of that bucket written (a trainer dying mid-push).
"""

from __future__ import annotations

import json
import os
import signal
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

JOIN_S = 240.0


def host_store() -> dist.TCPStore:
    """The store the ranks meet at, hosted by the test (it can watch the keys too)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def run_ranks(
    world_size: int,
    store: dist.TCPStore,
    ckpt: Path,
    endpoints: dict[str, str],
    sync: SyncConfig,
    out: Path,
    *,
    method: str = "shards",
    versions: tuple[int, ...] = (1,),
    kill: tuple[int, int] | None = None,
    device: str = "cpu",
) -> dict[int, Any]:
    """Run every rank to the end; rank -> its JSON result (None for a rank that died).
    `device` "cuda": the ranks' policy lives on cuda:<rank>, in an NCCL group."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    args = (world_size, store.port, str(ckpt), endpoints, asdict(sync), str(out), method, device)
    procs = [
        ctx.Process(target=rank_main, args=(r, *args, versions, kill)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_S)
        if p.is_alive():
            p.kill()
    results = {}
    for r in range(world_size):
        path = out / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else None
    return results


def rank_main(
    rank: int,
    world_size: int,
    port: int,
    ckpt: str,
    endpoints: dict[str, str],
    sync: dict[str, Any],
    out: str,
    method: str,
    device: str,
    versions: tuple[int, ...],
    kill: tuple[int, int] | None,
) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    result: dict[str, Any] = {"pushes": []}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            store=dist.PrefixStore("pg", store),
            rank=rank,
            world_size=world_size,
        )
        if kill is not None and kill[0] == rank:
            _die_after_bucket(kill[1])
        result["pushes"] = _push_versions(
            rank, world_size, store, ckpt, endpoints, sync, out, method, versions, device
        )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _push_versions(
    rank: int,
    world_size: int,
    store: dist.Store,
    ckpt: str,
    endpoints: dict[str, str],
    sync: dict[str, Any],
    out: str,
    method: str,
    versions: tuple[int, ...],
    device: str = "cpu",
) -> list[dict[str, Any]]:
    from trainer_side.rl.fsdp import shard_policy
    from trainer_side.rl.policy import LlamaPolicy
    from trainer_side.sync.push_report import PushError
    from trainer_side.sync.shard_push import ShardedPusher

    device = f"cuda:{rank}" if device == "cuda" else device
    policy = LlamaPolicy.from_pretrained(ckpt, device=device)
    shard_policy(policy, world_size, device)
    pusher = ShardedPusher(
        SyncConfig(**sync),
        endpoints if rank == 0 else None,
        Path(out) / "sync",
        store=store,
        rank=rank,
        world_size=world_size,
        method=method,
        device=device,
    )
    done = []
    try:
        for version in versions:
            _set_weights(policy, trainer_weights(Path(ckpt), version), rank)
            try:
                done.append(pusher.push(policy, version).to_dict())
            except PushError as exc:
                done.append({"push_error": str(exc), "version": version})
    finally:
        pusher.close()
    return done


def _set_weights(policy: torch.nn.Module, tensors: dict[str, torch.Tensor], rank: int) -> None:
    """Each rank copies its own rows of the full tensors into its shards."""
    from rlsync.transports.sharded.dim0 import dim0_shard

    with torch.no_grad():
        for name, p in policy.named_parameters():
            shard = dim0_shard(p, rank)
            if shard is not None:
                shard.local.copy_(tensors[name][shard.start : shard.start + shard.rows])


def _die_after_bucket(bucket: int) -> None:
    """This rank SIGKILLs itself once it reported bucket `bucket` written (fault injection)."""
    from rlsync.transports.sharded.channel import ShardChannel

    wrote = ShardChannel.wrote

    def wrote_then_die(self: ShardChannel, n: int, g: int) -> None:
        wrote(self, n, g)
        if g >= bucket:
            os.kill(os.getpid(), signal.SIGKILL)

    ShardChannel.wrote = wrote_then_die  # type: ignore[method-assign]
