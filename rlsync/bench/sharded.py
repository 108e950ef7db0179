"""`rlsync bench sync --trainer-ranks 1 2 4`: pushing from FSDP2-sharded trainers.

Per model size: write the bench checkpoint, start one engine from it; per trainer world
size and transport (ipc, broadcast): spawn that many ranks (`sharded_rank`), each holding
only its dim-0 shards of the same weights, and time, in the same run on the same weights:
- shards: every rank moves its own rows (`trainer_side.sync.shard_push`): over ipc it writes
  them into the engine's store (or rank 0's buffer); over broadcast it broadcasts them over
  a gloo group of its own with the engine, which receives them in place in its store;
- gather: every rank all-gathers each parameter (`full_tensor()`), rank 0 pushes the whole
  tensors through the normal pusher of that transport (what RL frameworks do today).
Each row reports the median push time and GB/s (model bytes / push seconds, rank 0's wall
time from the call to the engines' commit), the highest rise of rank 0's and of the other
ranks' resident memory during a push, and whether the engine then held the weights bit for
bit. The engine's weights are checked once per world size and transport, after its last push.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rlsync.bench import model as bench_model
from rlsync.bench.sharded_rank import spawn_ranks
from rlsync.bench.sync import machine_info
from rlsync.plan.buckets import tensor_fingerprint
from trainer_side.sync.shard_push import SHARD_TRANSPORTS

METHODS = ("shards", "gather")
JOIN_SLACK_S = 120.0


@dataclass(kw_only=True)
class ShardedBench:
    sizes: list[float] = field(default_factory=lambda: [0.25])
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4])
    transports: list[str] = field(default_factory=lambda: list(SHARD_TRANSPORTS))
    repeat: int = 3
    bucket_mb: float = 64.0
    layers: int = bench_model.DEFAULT_LAYERS
    timeout_s: float = 120.0
    engine_threads: int = 1
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.repeat < 1 or not self.sizes or not self.ranks or min(self.ranks) < 1:
            raise ValueError("repeat >= 1 and at least one size and trainer rank count >= 1")
        if not self.transports or not set(self.transports) <= set(SHARD_TRANSPORTS):
            raise ValueError(f"transports: one or more of {list(SHARD_TRANSPORTS)}")


def run_sharded(bench: ShardedBench, log: Any = None) -> dict[str, Any]:
    """Run the benchmark; {"machine", "config", "rows"} (JSON-ready)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="rlsync-shardbench-", dir=bench.work_dir))
    machine = machine_info()
    rows: list[dict[str, Any]] = []
    try:
        for size in bench.sizes:
            rows += _run_size(bench, size, work / f"size-{size:g}", log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["load_avg_end"] = os.getloadavg()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(bench).items()}
    return {"machine": machine, "config": config, "rows": rows}


def _run_size(bench: ShardedBench, size: float, work: Path, log: Any) -> list[dict[str, Any]]:
    from infer_side.process.client import launch_engine

    cfg = bench_model.bench_model_config(size, bench.layers)
    tensors = bench_model.make_weights(cfg)
    nbytes = bench_model.total_bytes(tensors)
    bench_model.write_bench_checkpoint(work / "checkpoint", cfg, tensors)
    want = {n: tensor_fingerprint(t) for n, t in tensors.items()}
    del tensors
    engine = launch_engine(
        work / "checkpoint", kv_tokens=1024, threads=bench.engine_threads, start_timeout_s=300
    )
    rows = []
    try:
        runs = [(w, t) for w in bench.ranks for t in bench.transports]
        for i, (world, transport) in enumerate(runs):
            out = work / f"ranks-{world}-{transport}"
            out.mkdir()
            first = (
                1 + 1000 * i
            )  # versions rise across runs: the engine refuses one not above its own
            results = _run_world(bench, size, world, transport, engine.endpoint, out, first)
            verified = engine.fingerprints().fingerprints == want
            rows += _rows(size, world, transport, nbytes, results, verified)
            for row in rows[-len(METHODS) :]:
                log(_format_row(row))
    finally:
        engine.close()
    return rows


def _run_world(
    bench: ShardedBench,
    size: float,
    world: int,
    transport: str,
    endpoint: str,
    out: Path,
    first_version: int,
) -> dict[int, Any]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    job = {
        "size_gib": size,
        "layers": bench.layers,
        "methods": list(METHODS),
        "repeat": bench.repeat,
        "endpoint": endpoint,
        "out": str(out),
        "sync": {
            "transport": transport,
            "bucket_mb": bench.bucket_mb,
            "timeout_s": bench.timeout_s,
        },
        "versions": {m: first_version + 100 * k for k, m in enumerate(METHODS)},
    }
    procs = spawn_ranks(world, store.port, job)
    deadline_s = (bench.repeat + 1) * len(METHODS) * 2 * bench.timeout_s + JOIN_SLACK_S
    for p in procs:
        p.join(deadline_s)
        if p.is_alive():
            p.kill()
    results = {}
    for r in range(world):
        path = out / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else {"error": "rank died"}
    return results


def _rows(
    size: float, world: int, transport: str, nbytes: int, results: dict[int, Any], verified: bool
) -> list[dict[str, Any]]:
    errors = [f"rank {r}: {res['error']}" for r, res in results.items() if "error" in res]
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {"size_gib": size, "ranks": world, "transport": transport}
        row["method"] = method
        row.update(bytes=nbytes, verified=verified, error="; ".join(errors))
        if not errors:
            times = results[0]["methods"][method]["seconds"]
            row["seconds"] = times
            row["median_s"] = statistics.median(times)
            row["gbps"] = nbytes / row["median_s"] / 1e9
            row["rank0_peak_mib"] = results[0]["methods"][method]["peak_rss_bytes"] / 2**20
            others = [results[r]["methods"][method]["peak_rss_bytes"] for r in range(1, world)]
            row["other_peak_mib"] = max(others) / 2**20 if others else None
        rows.append(row)
    return rows


def _format_row(row: dict[str, Any]) -> str:
    head = f"[{row['size_gib']:g} GiB, {row['ranks']} rank(s), {row['transport']}] {row['method']}"
    if row["error"]:
        return f"{head}: FAILED: {row['error'][:300]}"
    other = "-" if row["other_peak_mib"] is None else f"{row['other_peak_mib']:.0f}"
    return (
        f"{head}: median {row['median_s']:.3f}s, {row['gbps']:.2f} GB/s, peak +"
        f"{row['rank0_peak_mib']:.0f} MiB rank 0 / +{other} MiB others, verified {row['verified']}"
    )


def format_sharded(result: dict[str, Any]) -> str:
    """A Markdown table: size x ranks x transport x method."""
    lines = [
        "| size GiB | trainer ranks | transport | method | median s | GB/s | rank 0 peak +MiB "
        "| other ranks peak +MiB | engine bit-exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['size_gib']:g} | {r['ranks']} | {r['transport']} | {r['method']} |"
        if r["error"]:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | |")
            continue
        other = "-" if r["other_peak_mib"] is None else f"{r['other_peak_mib']:.0f}"
        lines.append(
            f"{head} {r['median_s']:.3f} | {r['gbps']:.2f} | {r['rank0_peak_mib']:.0f} "
            f"| {other} | {r['verified']} |"
        )
    return "\n".join(lines)
