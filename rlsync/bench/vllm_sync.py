"""`rlsync bench sync --engine vllm`: our transports pushing into our vLLM backend, next to the
paths people use with vLLM today, on the same weights in one run.

Rows (one model size, one engine):
- limit `memcpy`: one copy of the same bytes (`rlsync.bench.limits`);
- ours: the real `WeightPusher` into `launch_engine(ckpt, backend="vllm")` over broadcast,
  ipc and disk, in_place and shadow (disk in_place only). The engine receives into its
  staging store and loads it through vLLM's `reload_weights` between two steps;
- peers (`rlsync.bench.vllm_peers`, each a vLLM engine in a child process of its own):
  `disk-reload` (save_file, vLLM reloads from the path, prefix cache reset), `per-tensor`
  (gloo broadcast per tensor, one vLLM load call per tensor or fused group) and `native`
  (vLLM's weight-transfer API with a gloo backend).
The engine starts from a checkpoint of seed-0 weights and every method pushes the seed-1
weights, so afterwards each engine's greedy tokens for one prompt must equal ours: a load
that corrupted the model (a split fused group) shows up as a mismatch.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rlsync.bench import model as bench_model
from rlsync.bench.baselines import group_specs, record, sender_group
from rlsync.bench.procs import Receivers
from rlsync.bench.stats import Row, add_ratios, median_phases
from rlsync.plan.buckets import dtype_name
from rlsync.wire.protocol import LOAD_MODES, TRANSPORT_KINDS

PEERS = ("disk-reload", "per-tensor", "native")
PROMPT = [(7 * i + 3) % 97 + 1 for i in range(40)]
"""The greedy check's prompt (40 tokens: one full 32-token block is cached)."""
CHECK_TOKENS = 8
Log = Callable[[str], None]


@dataclass(kw_only=True)
class VllmSyncBench:
    """What to run; small by default (a shared 2-core box, one vLLM start per method)."""

    size_gib: float = 0.03
    layers: int = bench_model.DEFAULT_LAYERS
    transports: list[str] = field(default_factory=lambda: list(TRANSPORT_KINDS))
    modes: list[str] = field(default_factory=lambda: list(LOAD_MODES))
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    repeat: int = 3
    bucket_mb: float = 64.0
    timeout_s: float = 120.0
    start_timeout_s: float = 300.0
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise ValueError(f"peers: unknown {unknown} (known: {', '.join(PEERS)})")
        if self.repeat < 1 or self.size_gib <= 0:
            raise ValueError("repeat >= 1 and size_gib > 0 needed")


def run_vllm_sync(
    bench: VllmSyncBench, log: Log = lambda s: print(s, file=sys.stderr)
) -> dict[str, Any]:
    """Run every row; returns {"machine", "config", "model", "rows", "tokens"} (JSON-ready)."""
    from rlsync.bench.sync import guarded, machine_info

    machine = machine_info()
    cfg = bench_model.bench_model_config(bench.size_gib, bench.layers)
    start = bench_model.make_weights(cfg, seed=0)
    tensors = bench_model.make_weights(cfg, seed=1)
    nbytes = bench_model.total_bytes(tensors)
    work = Path(tempfile.mkdtemp(prefix="rlsync-vllmbench-", dir=bench.work_dir))
    rows: list[Row] = []
    tokens: dict[str, list[int]] = {}

    def new(method: str, kind: str, mode: str = "-") -> Row:
        row = Row(size_gib=bench.size_gib, engines=1, method=method, kind=kind, mode=mode)
        row.bytes = nbytes
        rows.append(row)
        return row

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer sends with 1 thread, as in `rlsync bench sync`
    try:
        ckpt = bench_model.write_bench_checkpoint(work / "checkpoint", cfg, start)
        from rlsync.bench.limits import run_memcpy

        guarded(new("memcpy", "limit"), lambda r: run_memcpy(r, tensors, repeat=bench.repeat), log)
        tokens.update(_ours(bench, new, tensors, ckpt, work, log))
        for peer in bench.peers:
            run = partial(
                run_peer, tensors=tensors, ckpt=ckpt, bench=bench, work=work, tokens=tokens
            )
            guarded(new(peer, "peer"), run, log)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows)
    machine["load_avg_end"] = os.getloadavg()
    model = bench_model.describe(cfg, tensors)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(bench).items()}
    return {
        "machine": machine,
        "config": config,
        "model": model,
        "rows": [r.to_dict() for r in rows],
        "tokens": tokens,
    }


def _ours(
    bench: VllmSyncBench,
    new: Callable[..., Row],
    tensors: dict[str, torch.Tensor],
    ckpt: Path,
    work: Path,
    log: Log,
) -> dict[str, list[int]]:
    """Our transports into one vLLM-backend engine; its greedy tokens after the pushes."""
    from infer_side.process.client import launch_engine
    from rlsync.bench.ours import ours_methods, run_ours
    from rlsync.bench.sync import guarded
    from rlsync.wire.protocol import SamplingParams

    pairs = ours_methods(bench.transports, bench.modes)
    if not pairs:
        return {}
    engine = launch_engine(
        ckpt,
        backend="vllm",
        kv_tokens=512,
        threads=1,
        start_timeout_s=bench.start_timeout_s,
        disk_root=work,  # disk pushes write there (--work-dir may be anywhere)
    )
    try:
        before = engine.generate([PROMPT], SamplingParams(max_new_tokens=CHECK_TOKENS))
        versions = itertools.count(1)
        for transport, mode in pairs:
            row = guarded(
                new(transport, "ours", mode),
                partial(
                    run_ours,
                    endpoints={"vllm": engine.endpoint},
                    tensors=tensors,
                    repeat=bench.repeat,
                    versions=versions,
                    work_dir=work,
                    timeout_s=bench.timeout_s,
                    bucket_mb=bench.bucket_mb,
                    probe=False,
                ),
                log,
            )
            if "engine_pause_s" in row.phases:
                row.engine_pause_ms = row.phases["engine_pause_s"] * 1e3
        (after,) = engine.generate([PROMPT], SamplingParams(max_new_tokens=CHECK_TOKENS))
        return {"before": list(before[0].output_ids), "ours": list(after.output_ids)}
    finally:
        engine.close()


def run_peer(
    row: Row,
    *,
    tensors: dict[str, torch.Tensor],
    ckpt: Path,
    bench: VllmSyncBench,
    work: Path,
    tokens: dict[str, list[int]],
) -> Row:
    """One peer method: a vLLM engine in a child process, `repeat` timed updates after one
    warm-up, then its greedy tokens (into `tokens[row.method]`)."""
    from rlsync.bench.vllm_peers import fused_groups

    names = list(tensors)
    if row.method == "per-tensor":  # the peer receives in load-call order
        names = [n for group in fused_groups(names) for n in group]
    listed = [[n, dtype_name(tensors[n].dtype), list(tensors[n].shape)] for n in names]
    base = {"checkpoint": str(ckpt), "tensors": listed, "max_len": 256}
    if row.method == "disk-reload":
        specs = [{"method": row.method, **base}]
    else:
        specs = group_specs(row.method, 1, bench.timeout_s, **base)
    samples: list[dict[str, float]] = []
    with Receivers(specs, work, bench.timeout_s, module="rlsync.bench.vllm_peers") as peer:
        peer.wait_all("ready", bench.start_timeout_s)
        group = None
        try:
            if row.method != "disk-reload":
                peer.send({"cmd": "init"})
                group = sender_group(specs[0])
                peer.wait_all("done")
            for rep in range(bench.repeat + 1):  # rep 0 warms up
                t0 = time.monotonic()
                extra: dict[str, float] = {}
                if group is None:
                    path = work / f"disk-reload-{uuid.uuid4().hex[:8]}"
                    path.mkdir()
                    save_file(tensors, str(path / "model.safetensors"))
                    extra["save_s"] = time.monotonic() - t0
                    peer.send({"cmd": "load", "path": str(path), "rep": rep})
                else:
                    peer.send({"cmd": "go", "rep": rep})
                    for name in names:
                        group.broadcast(tensors[name])
                t_sent = time.monotonic()
                events = peer.wait_all("done")
                if group is None:
                    shutil.rmtree(path)
                if rep:
                    record(
                        row, t0, t_sent, events, samples, {**extra, "flush_s": events[0]["flush_s"]}
                    )
            peer.send({"cmd": "generate", "prompt": PROMPT, "n": CHECK_TOKENS})
            (done,) = peer.wait_all("done")
        finally:
            if group is not None:
                group.destroy()
    row.phases = median_phases(samples)
    row.engine_pause_ms = (row.phases["load_s"] + row.phases["flush_s"]) * 1e3
    row.pause_note = "vLLM load calls + prefix-cache reset (the engine cannot step meanwhile)"
    tokens[row.method] = done["tokens"]
    return row


# ---------------------------------------------------------------- report

COLUMNS = (
    "method",
    "e2e best s",
    "median s",
    "GB/s",
    "x memcpy",
    "x ours",
    "engine total ms",
    "engine pause ms",
    "tokens = ours",
    "note",
)
NOTES = {
    "ours": "pause = UpdateDone pause_ms (median)",
    "disk-reload": "save_file (page cache, no fsync) + reload_weights(weights_path)",
    "per-tensor": "1 gloo broadcast per tensor; 1 reload call per tensor or fused group",
    "native": "start/update/finish_weight_update, gloo backend, per-tensor broadcast",
}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for the table: n/a for missing or not finite, no decimals from 100 up."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.0f}"


def tokens_cell(tokens: dict[str, list[int]], key: str) -> str:
    """'yes'/'NO' for a method whose engine produced tokens, against ours; n/a otherwise."""
    if key not in tokens or "ours" not in tokens:
        return "n/a"
    return "yes" if tokens[key] == tokens["ours"] else "NO"


def vllm_row_cells(r: dict[str, Any], tokens: dict[str, list[int]]) -> list[str]:
    """One table row; a failed method keeps its label and shows its error as the note."""
    label = f"**ours: {r['label']}**" if r["kind"] == "ours" else f"{r['kind']}: {r['label']}"
    if r["error"]:
        return [label, "FAILED", *[""] * (len(COLUMNS) - 3), r["error"].splitlines()[0][:100]]
    phases = r.get("phases") or {}
    total = phases.get("engine_total_s")  # ours: UpdateDone timings, arrival to reply
    if total is None and "load_s" in phases:  # peers: their receive, load calls and reset
        total = sum(phases.get(k, 0.0) for k in ("recv_s", "load_s", "flush_s"))
    if r["kind"] == "ours":
        check = "(reference)"
        note = NOTES["ours"] + ("; bit-exact" if r.get("verified") else "; MISMATCH")
    else:
        check = tokens_cell(tokens, r["method"])
        note = NOTES.get(r["method"], "limit")
    return [
        label,
        fmt(r["best_s"]),
        fmt(r["median_s"]),
        fmt(r["gbps"], 2),
        fmt(r["x_memcpy"], 2),
        fmt(r["x_ours"], 1),
        fmt(None if total is None else total * 1e3, 1),
        fmt(r["engine_pause_ms"], 1),
        check if r["kind"] != "limit" else "n/a",
        note,
    ]


def format_vllm_sync(result: dict[str, Any]) -> str:
    """The Markdown table of one run (ratios within the run) and the greedy-token check."""
    m = result["model"]
    order = {"limit": 0, "ours": 1, "peer": 2}
    rows = sorted(result["rows"], key=lambda r: order.get(r["kind"], 9))
    tokens = result.get("tokens", {})
    lines = [
        f"\nweight sync into vLLM (1 engine): {m['bytes'] / 2**30:.3f} GiB fp32, "
        f"{m['tensors']} tensors, hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']}/{m['kv_heads']} heads; best of {result['config']['repeat']} (median)\n",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(vllm_row_cells(r, tokens)) + " |" for r in rows]
    if tokens:
        lines.append(
            f"\ngreedy tokens after the pushes: ours {tokens.get('ours')} "
            f"(before: {tokens.get('before')})"
        )
    return "\n".join(lines) + "\n"
