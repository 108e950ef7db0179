"""One trainer rank of `rlsync bench sync --trainer-ranks`: a spawned process in a gloo group
that holds only its dim-0 shard of every bench tensor (DTensors, as FSDP2 leaves them) and
times pushes by each method. Rank 0 times the whole push; every rank measures how far its
resident memory rose above where it stood before the push (VmHWM, reset per push).

Results go to `out/rank{r}.json`; nothing here prints.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from rlsync.bench import model as bench_model
from rlsync.config import SyncConfig


def rank_main(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    out: dict[str, Any] = {"rank": rank}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world
        )
        params = local_shards(job["size_gib"], job["layers"], rank, world)
        out["methods"] = {
            m: _time_method(m, rank, world, store, params, job) for m in job["methods"]
        }
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["trace"] = traceback.format_exc()
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(out))
    if dist.is_initialized():
        dist.destroy_process_group()


def local_shards(size_gib: float, layers: int, rank: int, world: int) -> dict[str, DTensor]:
    """The bench weights (`bench_model.make_weights`, same bytes) as dim-0 DTensor shards:
    each full tensor is drawn in turn and only this rank's rows are kept."""
    mesh = init_device_mesh("cpu", (world,))
    cfg = bench_model.bench_model_config(size_gib, layers)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, full in bench_model.iter_weights(cfg, gen):
        chunk = -(-full.shape[0] // world)
        start = min(rank * chunk, full.shape[0])
        local = full[start : start + chunk].clone()
        out[name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
    return out


def _time_method(
    method: str, rank: int, world: int, store: dist.Store, params: dict, job: dict[str, Any]
) -> dict[str, Any]:
    from trainer_side.sync.shard_push import ShardedPusher

    pusher = ShardedPusher(
        SyncConfig(**job["sync"]),
        {"engine0": job["endpoint"]} if rank == 0 else None,
        Path(job["out"]) / "sync",
        store=store,
        rank=rank,
        world_size=world,
        method=method,
    )
    seconds, peaks = [], []
    try:
        for i in range(job["repeat"] + 1):  # the first push is a warm-up (buffers, plan)
            dist.barrier()
            base = _reset_peak()
            t0 = time.perf_counter()
            pusher.push(params, job["versions"][method] + i)
            took = time.perf_counter() - t0
            peak = _peak_rss() - base
            if i:
                seconds.append(took)
                peaks.append(peak)
    finally:
        pusher.close()
    return {"seconds": seconds, "peak_rss_bytes": max(peaks)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Give freed heap pages back to the OS (else a push that reuses them shows no rise),
    then reset this process's peak RSS to its current RSS (Linux clear_refs 5); returns it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def spawn_ranks(world: int, port: int, job: dict[str, Any]) -> list[Any]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, job)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


if __name__ == "__main__":  # pragma: no cover - spawned through spawn_ranks
    raise SystemExit(f"{os.path.basename(__file__)}: started by rlsync.bench.sharded")
