"""Baselines people run today, each against engine-side receiver processes that load into an
engine-layout weight store (see `receiver`):

- per-tensor broadcast: one gloo broadcast per tensor, no buckets (the OpenRLHF/TRL way);
- safetensors round trip: `save_file` of the state dict, then every receiver reads the file
  tensor by tensor into its store (SGLang's update-from-disk).

No live engine runs here, so there is no token stream to probe: the pause columns hold the
receivers' own receive + load time (what an engine loading in place would stall for).
End to end runs from the start of the send until every receiver reported its load done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rlsync.bench.procs import Receivers
from rlsync.bench.stats import Row, median_phases
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import dtype_name
from rlsync.procs import child_env
from rlsync.transports.broadcast import BroadcastGroup
from rlsync.wire.netutil import free_port

NO_ENGINE = "no live engine: pause = receiver's receive+load time"


def group_specs(method: str, engines: int, timeout_s: float, **extra: Any) -> list[dict[str, Any]]:
    """Receiver specs for ranks 1..engines of a fresh gloo group (rank 0 is the sender)."""
    port, group = free_port(), f"bench-{uuid.uuid4().hex[:8]}"
    return [
        {
            "method": method,
            "port": port,
            "rank": i + 1,
            "world": engines + 1,
            "group": group,
            "timeout_s": timeout_s,
            **extra,
        }
        for i in range(engines)
    ]


def sender_group(spec: dict[str, Any]) -> BroadcastGroup:
    return BroadcastGroup.create(
        master_address="127.0.0.1",
        master_port=spec["port"],
        rank=0,
        world_size=spec["world"],
        backend="gloo",
        timeout_s=spec["timeout_s"],
        group_name=spec["group"],
    )


def record(
    row: Row,
    t0: float,
    t_sent: float,
    events: list[dict[str, Any]],
    samples: list[dict[str, float]],
    extra: dict[str, float] | None = None,
) -> None:
    """One timed repetition: e2e to the last receiver's done, trainer block, phases."""
    row.seconds.append(max(ev["t_done"] for ev in events) - t0)
    row.block_s.append(t_sent - t0)
    sample = {k: max(ev[k] for ev in events) for k in ("recv_s", "load_s") if k in events[0]}
    samples.append({**sample, **(extra or {})})


def finish(row: Row, samples: list[dict[str, float]], note: str = NO_ENGINE) -> Row:
    row.phases = median_phases(samples)
    row.engine_pause_ms = (row.phases.get("recv_s", 0.0) + row.phases.get("load_s", 0.0)) * 1e3
    row.pause_note = note
    return row


def run_per_tensor(
    row: Row,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    repeat: int,
    work_dir: Path,
    timeout_s: float,
) -> Row:
    """Broadcast every tensor on its own; receivers allocate, receive and copy each."""
    names = [[n, dtype_name(t.dtype), list(t.shape)] for n, t in tensors.items()]
    specs = group_specs(
        "per-tensor", row.engines, timeout_s, model=dataclasses.asdict(cfg), tensors=names
    )
    samples: list[dict[str, float]] = []
    with Receivers(specs, work_dir, timeout_s) as receivers:
        group = sender_group(specs[0])
        try:
            receivers.wait_all("ready")
            for rep in range(repeat + 1):  # rep 0 warms up
                t0 = time.monotonic()
                receivers.send({"cmd": "go", "rep": rep})
                for t in tensors.values():
                    group.broadcast(t)
                t_sent = time.monotonic()
                events = receivers.wait_all("done")
                if rep:
                    record(row, t0, t_sent, events, samples)
        finally:
            group.destroy()
    return finish(row, samples)


def run_safetensors(
    row: Row,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    repeat: int,
    work_dir: Path,
    timeout_s: float,
) -> Row:
    """save_file, then every receiver loads the file; a fresh file per repetition."""
    specs = [{"method": "safetensors", "model": dataclasses.asdict(cfg)}] * row.engines
    samples: list[dict[str, float]] = []
    disk = work_dir / f"safetensors-{uuid.uuid4().hex[:8]}"
    disk.mkdir()
    with Receivers(specs, work_dir, timeout_s) as receivers:
        receivers.wait_all("ready")
        previous: Path | None = None
        for rep in range(repeat + 1):
            path = disk / f"v{rep}.safetensors"
            t0 = time.monotonic()
            save_file(tensors, str(path))
            t_sent = time.monotonic()
            receivers.send({"cmd": "load", "path": str(path), "rep": rep})
            events = receivers.wait_all("done")
            if rep:
                record(row, t0, t_sent, events, samples, {"save_s": t_sent - t0})
            if previous is not None:
                previous.unlink()
            previous = path
        if previous is not None:
            previous.unlink()
    disk.rmdir()
    return finish(row, samples, NO_ENGINE + " (file read from the page cache)")


def run_pickle(row: Row, checkpoint: Path, *, repeat: int, timeout_s: float) -> Row:
    """Pickle over ZMQ, run as its own process (`rlsync.bench.pickle_baseline` is imported by
    nothing): it reads the same weights from the benchmark's checkpoint."""
    cmd = [
        sys.executable,
        "-m",
        "rlsync.bench.pickle_baseline",
        "send",
        "--checkpoint",
        str(checkpoint),
        "--engines",
        str(row.engines),
        "--repeat",
        str(repeat),
        "--timeout",
        str(timeout_s),
    ]
    budget = 60.0 + (repeat + 1) * (timeout_s + 10.0)
    # its own process group: on a timeout the sender and the receivers it started all go
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"pickle baseline: no result within {budget:.0f}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"pickle baseline exited {proc.returncode}: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    row.seconds, row.block_s = result["seconds"], result["block_s"]
    return finish(row, result["samples"], NO_ENGINE + " (receive = unpickle)")
