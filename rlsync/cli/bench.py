"""`rlsync bench`: the weight-sync and generation benchmarks (see docs/BENCHMARKS.md).

rlsync bench sync [--size-gib 0.25 1] [--engines 1 2] [--repeat 3] [--json P] [--plot P] [--gpu]
rlsync bench generate [--batch 1 8 32] [--max-new-tokens 64] [--engine vllm] [--json P]
rlsync bench sync --engine vllm [--size-gib 0.03] [--repeat 3] [--json P]
rlsync bench sync --trainer-ranks 1 2 4 [--transports ipc broadcast] [--size-gib 0.25] [--json P]
rlsync bench commit [--engines 2 4] [--transports ipc broadcast] [--busy] [--json P]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlsync.wire.protocol import LOAD_MODES

ENGINE_BACKENDS = ("rlsync", "vllm")
"""Engine backends the benchmarks can put side by side (`launch_engine(backend=...)`)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: weight sync vs baselines; generation vs HF")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="{sync,generate,commit}")
    _add_sync(kinds)
    _add_generate(kinds)
    _add_commit(kinds)


def _add_sync(kinds: argparse._SubParsersAction) -> None:
    from rlsync.bench.sync import ALL_METHODS
    from rlsync.bench.vllm_sync import PEERS as VLLM_PEERS

    s = kinds.add_parser("sync", help="weight sync: our transports vs baselines vs limits")
    s.add_argument(
        "--size-gib",
        type=float,
        nargs="+",
        default=None,
        help="model sizes (GiB of fp32 weights; default 0.25 1, with --engine vllm 0.03)",
    )
    s.add_argument(
        "--engine",
        choices=ENGINE_BACKENDS,
        default="rlsync",
        help="vllm: push into our vLLM backend next to vLLM's own update paths (one size)",
    )
    s.add_argument(
        "--peers",
        nargs="+",
        choices=VLLM_PEERS,
        default=list(VLLM_PEERS),
        help="with --engine vllm: vLLM's own update paths to run",
    )
    s.add_argument("--engines", type=int, nargs="+", default=[1, 2], help="engine counts")
    s.add_argument(
        "--trainer-ranks",
        type=int,
        nargs="+",
        default=None,
        help="FSDP2-sharded trainer world sizes: each rank pushes its own shards vs "
        "gather-to-rank-0-then-push (one engine; default size 0.25 GiB)",
    )
    s.add_argument(
        "--transports",
        nargs="+",
        choices=("ipc", "broadcast"),
        default=["ipc", "broadcast"],
        help="with --trainer-ranks: the transports to push over",
    )
    s.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        default=list(ALL_METHODS),
        metavar="M",
        help=f"subset of: {' '.join(ALL_METHODS)}",
    )
    s.add_argument(
        "--modes",
        nargs="+",
        choices=LOAD_MODES,
        default=list(LOAD_MODES),
        help="load modes for our transports",
    )
    s.add_argument("--repeat", type=int, default=3, help="timed repetitions (after a warm-up)")
    s.add_argument("--bucket-mb", type=float, default=64.0)
    s.add_argument("--layers", type=int, default=24, help="decoder layers of the bench model")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds for every wait")
    s.add_argument("--no-probe", action="store_true", help="skip the streaming pause probe")
    s.add_argument("--engine-threads", type=int, default=1, help="torch threads per engine")
    s.add_argument(
        "--trainer-threads",
        type=int,
        default=1,
        help="torch threads of the pushing (trainer) process; 0: torch's default",
    )
    s.add_argument("--no-profile", action="store_true", help="skip timing each copy alone")
    s.add_argument("--work-dir", type=Path, default=None, help="scratch parent (default: temp)")
    s.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    s.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart")
    gpu = s.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu", action="store_true", help="run the GPU section (default: when CUDA is available)"
    )
    gpu.add_argument("--no-gpu", action="store_true", help="never run the GPU section")
    s.add_argument("--gpu-only", action="store_true", help="only the GPU section")
    s.add_argument("--gpu-size-gib", type=float, default=1.0)
    d = s.add_argument_group("delta pushes (--delta)")
    d.add_argument(
        "--delta",
        action="store_true",
        help="delta pushes next to full ones (first --size-gib and --engines; transports from "
        "--methods, default broadcast ipc; --modes default in_place)",
    )
    d.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.001, 0.01, 0.1, 1.0],
        help="shares of elements changed per push",
    )
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.set_defaults(func=run_sync_cmd)


def _add_generate(kinds: argparse._SubParsersAction) -> None:
    g = kinds.add_parser("generate", help="generation tokens/s: our engine vs HF generate")
    g.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--repeat", type=int, default=3)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--no-server", action="store_true", help="skip the engine server process")
    g.add_argument(
        "--engine",
        "--engines",
        dest="engine",
        nargs="+",
        choices=ENGINE_BACKENDS,
        default=["rlsync"],
        help="engine backends; 'vllm' adds our server with the vLLM backend next to ours",
    )
    g.add_argument("--json", type=Path, default=None)
    g.set_defaults(func=run_generate_cmd)


def _add_commit(kinds: argparse._SubParsersAction) -> None:
    from rlsync.wire.protocol import COMMIT_MODES

    c = kinds.add_parser("commit", help="commit skew across engines: independent vs atomic")
    c.add_argument("--engines", type=int, nargs="+", default=[2, 4], help="engine counts")
    c.add_argument(
        "--transports",
        nargs="+",
        choices=("ipc", "broadcast", "disk"),
        default=["ipc", "broadcast"],
    )
    c.add_argument("--commits", nargs="+", choices=COMMIT_MODES, default=list(COMMIT_MODES))
    c.add_argument("--size-gib", type=float, default=0.05, help="GiB of fp32 weights")
    c.add_argument("--layers", type=int, default=8)
    c.add_argument("--repeat", type=int, default=10, help="timed pushes (after a warm-up)")
    c.add_argument("--bucket-mb", type=float, default=16.0)
    c.add_argument("--timeout", type=float, default=60.0, help="seconds for every wait")
    c.add_argument("--busy", action="store_true", help="engines stream a generate meanwhile")
    c.add_argument("--engine-threads", type=int, default=1, help="torch threads per engine")
    c.add_argument("--work-dir", type=Path, default=None, help="scratch parent (default: temp)")
    c.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    c.set_defaults(func=run_commit_cmd)


def run_commit_cmd(args: argparse.Namespace) -> int:
    from rlsync.bench.commit import CommitBench, format_commit, run_commit

    return _run_bench(
        args,
        lambda: CommitBench(
            engines=args.engines,
            transports=args.transports,
            commits=args.commits,
            size_gib=args.size_gib,
            layers=args.layers,
            repeat=args.repeat,
            bucket_mb=args.bucket_mb,
            timeout_s=args.timeout,
            busy=args.busy,
            engine_threads=args.engine_threads,
            work_dir=args.work_dir,
        ),
        run_commit,
        format_commit,
        None,
    )


def run_sync_cmd(args: argparse.Namespace) -> int:
    import torch

    if args.engine == "vllm":
        return run_vllm_sync_cmd(args)
    if args.delta:
        return run_delta_cmd(args)
    if args.trainer_ranks:
        return run_sharded_cmd(args)
    args.size_gib = args.size_gib or [0.25, 1.0]
    from rlsync.bench import report
    from rlsync.bench.gpu import format_gpu
    from rlsync.bench.sync import SyncBench, machine_info, run_sync

    try:
        bench = SyncBench(
            sizes=args.size_gib,
            engines=args.engines,
            methods=args.methods,
            modes=args.modes,
            repeat=args.repeat,
            bucket_mb=args.bucket_mb,
            timeout_s=args.timeout,
            layers=args.layers,
            probe=not args.no_probe,
            engine_threads=args.engine_threads,
            work_dir=args.work_dir,
            trainer_threads=args.trainer_threads or None,
            profile=not args.no_profile,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rlsync.bench.targets import check_targets, format_targets

    result = {"machine": machine_info(), "rows": []} if args.gpu_only else run_sync(bench)
    result["targets"] = check_targets(result)
    if args.gpu or args.gpu_only or (torch.cuda.is_available() and not args.no_gpu):
        result["gpu"] = _gpu_section(args)
    if result["rows"]:
        print(report.format_table(result))
        print(report.format_profile(result))
        print(format_targets(result["targets"]))
    if "gpu" in result:
        print(format_gpu(result["gpu"]))
    if args.json:
        report.write_json(result, args.json)
    if args.plot and result["rows"]:
        report.plot(result, args.plot)
    return 1 if any(r["error"] for r in result["rows"]) or "error" in result.get("gpu", {}) else 0


def run_delta_cmd(args: argparse.Namespace) -> int:
    """`bench sync --delta`: one size, one engine count, delta vs full per transport."""
    from rlsync.bench.delta_sync import DeltaBench, format_delta, run_delta
    from rlsync.bench.sync import ALL_METHODS

    explicit = args.methods != list(ALL_METHODS)
    transports = [m for m in args.methods if m in ("broadcast", "ipc", "disk")]
    return _run_bench(
        args,
        lambda: DeltaBench(
            size_gib=(args.size_gib or [0.25])[0],
            dtype=args.dtype,
            engines=args.engines[0],
            transports=transports if explicit else ["broadcast", "ipc"],
            modes=args.modes if args.modes != list(LOAD_MODES) else ["in_place"],
            fractions=args.fractions,
            repeat=args.repeat,
            bucket_mb=args.bucket_mb,
            timeout_s=args.timeout,
            layers=args.layers,
            engine_threads=args.engine_threads,
            trainer_threads=args.trainer_threads or 1,
            work_dir=args.work_dir,
        ),
        run_delta,
        format_delta,
        None,
    )


def run_vllm_sync_cmd(args: argparse.Namespace) -> int:
    """`bench sync --engine vllm`: one size (the first of --size-gib), one engine."""
    from rlsync.bench.vllm_sync import VllmSyncBench, format_vllm_sync, run_vllm_sync
    from rlsync.wire.protocol import TRANSPORT_KINDS

    return _run_bench(
        args,
        lambda: VllmSyncBench(
            size_gib=(args.size_gib or [0.03])[0],
            layers=args.layers,
            transports=[m for m in args.methods if m in TRANSPORT_KINDS],
            modes=args.modes,
            peers=args.peers,
            repeat=args.repeat,
            bucket_mb=args.bucket_mb,
            timeout_s=args.timeout,
            work_dir=args.work_dir,
        ),
        run_vllm_sync,
        format_vllm_sync,
        lambda r: any(row["error"] for row in r["rows"]),
    )


def run_sharded_cmd(args: argparse.Namespace) -> int:
    """`bench sync --trainer-ranks ...`: sharded push vs gather-then-push, one engine."""
    from rlsync.bench.sharded import ShardedBench, format_sharded, run_sharded

    return _run_bench(
        args,
        lambda: ShardedBench(
            sizes=args.size_gib or [0.25],
            ranks=args.trainer_ranks,
            transports=args.transports,
            repeat=args.repeat,
            bucket_mb=args.bucket_mb,
            layers=args.layers,
            timeout_s=args.timeout,
            engine_threads=args.engine_threads,
            work_dir=args.work_dir,
        ),
        run_sharded,
        format_sharded,
        lambda r: any(row["error"] or not row["verified"] for row in r["rows"]),
    )


def _run_bench(
    args: argparse.Namespace,
    make: Callable[[], Any],
    run: Callable[[Any], dict],
    show: Callable[[dict], str],
    failed: Callable[[dict], bool] | None,
) -> int:
    """Build a bench (a bad option: exit 2, naming it), run it, print its table, write
    --json; exit 1 when `failed` says a row failed."""
    from rlsync.bench.report import write_json

    try:
        bench = make()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run(bench)
    print(show(result))
    if args.json:
        write_json(result, args.json)
    return 1 if failed is not None and failed(result) else 0


def _gpu_section(args: argparse.Namespace) -> dict:
    import tempfile

    from rlsync.bench.gpu import run_gpu

    with tempfile.TemporaryDirectory(prefix="rlsync-gpubench-", dir=args.work_dir) as tmp:
        try:
            return run_gpu(
                args.gpu_size_gib, repeat=args.repeat, work_dir=Path(tmp), timeout_s=args.timeout
            )
        except Exception as exc:
            print(f"GPU section failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {"error": f"{type(exc).__name__}: {exc}"}


def run_generate_cmd(args: argparse.Namespace) -> int:
    from rlsync.bench.generate import format_generate, format_generate_vllm, run_generate
    from rlsync.bench.report import write_json

    if min(args.batch) < 1 or args.max_new_tokens < 1 or args.repeat < 1:
        print("error: --batch, --max-new-tokens and --repeat must be >= 1", file=sys.stderr)
        return 2
    result = run_generate(
        args.batch,
        max_new=args.max_new_tokens,
        repeat=args.repeat,
        server=not args.no_server,
        threads=args.threads,
        vllm="vllm" in args.engine,
    )
    print(format_generate(result))
    if result["vllm"]:
        print(format_generate_vllm(result))
    if args.json:
        write_json(result, args.json)
    return 0
