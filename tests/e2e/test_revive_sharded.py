"""A sharded (FSDP2) push brings back an engine it missed, as a one-rank push does.

Two trainer ranks (spawned processes in a gloo group, the policy under `fully_shard`) push
three versions with `ShardedPusher` to two real engine processes; rank 0 stops engine1
(SIGSTOP) for the whole second push and thaws it right after. The second push reaches only
engine0; the third must ping engine1, find it, and push it in full with every rank writing
(ipc) or broadcasting (broadcast, over a group re-formed with engine1) its own rows: both
engines then hold the third version bit for bit and generate the same tokens.
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

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.plan.buckets import dtype_from_name, tensor_fingerprint
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.shard_procs import JOIN_S, host_store
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights

TIMEOUT_S = 3.0
VERSIONS = (1, 2, 3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=51)


@pytest.fixture
def engines(ckpt):
    clients = {f"engine{i}": launch_engine(ckpt, kv_tokens=256, threads=1) for i in range(2)}
    yield clients
    for client in clients.values():
        client.close()


def rank_main(
    rank: int, port: int, ckpt: str, endpoints: dict, sync: dict, out: str, freeze_pid: int
) -> None:
    """One trainer rank: push VERSIONS; rank 0 freezes `freeze_pid` across the second push."""
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=2
        )
        pushes = _push_all(rank, store, ckpt, endpoints, SyncConfig(**sync), out, freeze_pid)
        result["pushes"] = pushes
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _push_all(
    rank: int, store, ckpt: str, endpoints: dict, sync: SyncConfig, out: str, freeze_pid: int
) -> list:
    from rlsync.transports.sharded.dim0 import dim0_shard
    from trainer_side.rl.fsdp import shard_policy
    from trainer_side.rl.policy import LlamaPolicy
    from trainer_side.sync.push_report import PushError
    from trainer_side.sync.shard_push import ShardedPusher

    policy = LlamaPolicy.from_pretrained(ckpt)
    shard_policy(policy, 2, "cpu")
    pusher = ShardedPusher(
        sync, endpoints if rank == 0 else None, Path(out) / "sync", store=store, rank=rank,
        world_size=2, method="shards",
    )  # fmt: skip
    done = []
    try:
        for i, version in enumerate(VERSIONS):
            full = trainer_weights(Path(ckpt), version)
            with torch.no_grad():  # each rank holds its own rows of the version
                for name, p in policy.named_parameters():
                    shard = dim0_shard(p, rank)
                    if shard is not None:
                        shard.local.copy_(full[name][shard.start : shard.start + shard.rows])
            frozen = freeze_pid if rank == 0 and i == 1 else None
            if frozen:
                os.kill(frozen, signal.SIGSTOP)
            try:
                done.append(pusher.push(policy, version).to_dict())
            except PushError as exc:
                done.append({"push_error": str(exc)})
            finally:
                if frozen:
                    os.kill(frozen, signal.SIGCONT)
    finally:
        pusher.close()
    return done


@pytest.mark.parametrize("transport", ["ipc", "broadcast"])
def test_a_sharded_push_brings_back_an_engine_it_missed(engines, ckpt, tmp_path, transport):
    store = host_store()
    sync = SyncConfig(transport=transport, bucket_mb=0.02, timeout_s=TIMEOUT_S)
    endpoints = {n: c.endpoint for n, c in engines.items()}
    pid = engines["engine1"].process.pid
    args = (store.port, str(ckpt), endpoints, asdict(sync), str(tmp_path), pid)
    procs = [mp.get_context("spawn").Process(target=rank_main, args=(r, *args)) for r in (0, 1)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        os.kill(pid, signal.SIGCONT)  # whatever happened to rank 0
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all("error" not in r for r in results), results
    first, missed, back = results[0]["pushes"]
    assert first["failed"] == [] and missed["failed"] == ["engine1"], missed
    assert back["failed"] == [] and back["revived"] == ["engine1"], back
    dtypes = {s.name: dtype_from_name(s.dtype) for s in engines["engine0"].weight_specs().specs}
    want = {n: tensor_fingerprint(t.to(dtypes[n])) for n, t in trainer_weights(ckpt, 3).items()}
    for client in engines.values():
        prints = client.fingerprints()
        assert prints.weight_version == 3 and prints.fingerprints == want
    outs = [[o.output_ids for o in c.generate(PROMPTS, greedy())] for c in engines.values()]
    assert outs[0] == outs[1]
