"""`rlsync push`: push a Hugging Face checkpoint directory to running engines.

rlsync push --checkpoint DIR --endpoint E [--endpoint E2 ...] --transport ipc --version 3 --json
rlsync push --checkpoint NEW --delta --base-checkpoint OLD ...   (send only what changed)
rlsync push ... --load-mode shadow --commit atomic     # every engine switches, or none does
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from rlsync.wire.protocol import COMMIT_MODES, LOAD_MODES, PAUSE_MODES, TRANSPORT_KINDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="push a checkpoint's weights to running engines")
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    p.add_argument(
        "--endpoint", action="append", required=True, help="engine endpoint (repeatable)"
    )
    p.add_argument("--transport", choices=TRANSPORT_KINDS, default="ipc")
    p.add_argument(
        "--version", type=int, required=True, help="weight version to publish (> current)"
    )
    p.add_argument("--no-flush", action="store_true", help="keep the KV/prefix cache (stale KV!)")
    p.add_argument(
        "--torch-empty-cache",
        action="store_true",
        help="also call torch.cuda.empty_cache() in the flush (syncs every CUDA stream)",
    )
    p.add_argument(
        "--verify", action="store_true", help="check every bucket's fingerprint on arrival"
    )
    p.add_argument(
        "--delta",
        action="store_true",
        help="send only what changed against --base-checkpoint (without it: a full push)",
    )
    p.add_argument(
        "--base-checkpoint",
        default=None,
        help="with --delta: the checkpoint the engines hold now (checked by fingerprint)",
    )
    p.add_argument("--load-mode", choices=LOAD_MODES, default="in_place")
    p.add_argument("--pause-mode", choices=PAUSE_MODES, default=None)
    p.add_argument(
        "--commit",
        choices=COMMIT_MODES,
        default="independent",
        help="atomic: every engine switches to the version, or none does (needs "
        "--load-mode shadow)",
    )
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for every wait")
    p.add_argument("--json", action="store_true", help="print the per-engine report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infer_side.process.client import EngineUnreachable, check_reachable
    from rlsync.wire.endpoints import EndpointError

    try:
        for endpoint in args.endpoint:  # before the heavy imports: nothing to wait for
            check_reachable(endpoint)
    except (EndpointError, EngineUnreachable) as exc:
        print(f"error: cannot reach an engine: {exc}", file=sys.stderr)
        return 2
    from rlsync.config import ConfigError, SyncConfig
    from trainer_side.sync.push_report import PushError
    from trainer_side.sync.pusher import WeightPusher

    try:
        cfg = SyncConfig(
            transport=args.transport,
            bucket_mb=args.bucket_mb,
            load_mode=args.load_mode,
            pause_mode=args.pause_mode,
            flush_cache=not args.no_flush,
            torch_empty_cache=args.torch_empty_cache,
            verify=args.verify,
            timeout_s=args.timeout,
            commit=args.commit,
            delta=args.delta,
        )
    except ConfigError as exc:  # before anything is sent, or any engine contacted
        key, _, why = str(exc).partition(": ")
        print(f"error: --{key.replace('_', '-')}: {why}", file=sys.stderr)
        return 2
    if args.base_checkpoint and not args.delta:
        print("error: --base-checkpoint needs --delta", file=sys.stderr)
        return 2
    endpoints = {f"engine{i}": e for i, e in enumerate(args.endpoint)}
    try:
        parent = disk_parent(args.endpoint, args.timeout) if args.transport == "disk" else None
        work_dir = tempfile.TemporaryDirectory(prefix="rlsync-push-", dir=parent)
    except (ValueError, OSError) as exc:  # at once: nothing to wait for
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    with work_dir as work:
        try:
            pusher = WeightPusher(cfg, endpoints, work)
        except Exception as exc:
            print(f"error: cannot reach the engines: {exc}", file=sys.stderr)
            return 2
        try:
            tensors = _read(args.checkpoint, pusher)
            if args.base_checkpoint:
                pusher.adopt_base(_read(args.base_checkpoint, pusher))
            report = pusher.push(tensors, args.version)
        except PushError as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.json and exc.report is not None:  # which engine stopped it, and why
                print(json.dumps(exc.report.to_dict(), indent=2))
            return 1
        finally:
            pusher.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif args.delta:
        print(
            f"version {report.version} via {report.transport} ({report.delta}): "
            f"{report.wire_bytes / 1e6:.2f} MB sent for {report.bytes / 1e6:.1f} MB of weights "
            f"in {report.seconds:.3f}s; {report.summary()}"
        )
    else:
        print(
            f"version {report.version} via {report.transport}: {report.bytes / 1e6:.1f} MB in "
            f"{report.seconds:.3f}s ({report.gbps:.2f} GB/s); {report.summary()}"
        )
    return 1 if report.failed else 0


def _read(path: str, pusher: object) -> dict:
    from rlsync.checkpoint_io import iter_checkpoint_tensors

    tensors = dict(iter_checkpoint_tensors(path))
    if "lm_head.weight" not in pusher.specs:  # type: ignore[attr-defined]
        tensors.pop("lm_head.weight", None)  # tied embeddings: the engine has no lm_head
    return tensors


def disk_parent(endpoints: list[str], timeout_s: float) -> str | None:
    """Where a disk push writes its files: under the disk root every engine reports (an
    engine reads only under its root; docs/PROTOCOL.md, Disk root). None: no engine
    reports one (the temp dir, as before)."""
    from rlsync.wire.protocol import EngineInfo, GetInfo
    from rlsync.wire.rpc import RpcClient, RpcTimeout

    roots = {}
    for endpoint in endpoints:
        with RpcClient(endpoint, timeout_s=timeout_s) as rpc:
            try:
                info = rpc.call(GetInfo())
            except RpcTimeout:
                raise ValueError(
                    f"--endpoint {endpoint}: no answer within {timeout_s:g} s"
                ) from None
        if isinstance(info, EngineInfo) and info.disk_root:
            roots[endpoint] = info.disk_root
    if len(set(roots.values())) > 1:
        listed = ", ".join(f"{e}: {r}" for e, r in roots.items())
        raise ValueError(
            f"--transport disk: the engines read under different disk roots ({listed})"
        )
    return next(iter(roots.values()), None)
