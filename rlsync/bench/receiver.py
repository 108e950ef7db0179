"""An engine-side receiver process for the baselines and limits (not a real engine: no
generation, just the receive and the load into an engine-layout `ModelWeights` store).

    python -m rlsync.bench.receiver SPEC.json

Methods (spec["method"]):
- "per-tensor": one gloo broadcast per tensor into a fresh `torch.empty`, then a copy into
  the store: how OpenRLHF/TRL-style loops update vLLM (allocate, broadcast, load_weights),
  minus their per-tensor control call (so this baseline is if anything optimistic).
- "raw-broadcast": one broadcast into one preallocated, pre-faulted buffer: the limit.
- "safetensors": open a safetensors file and load it tensor by tensor into the store, as
  SGLang's update-from-disk does.
Commands come one JSON line at a time on stdin ({"cmd": "go"|"load"|"exit"}); events go out
one JSON line at a time on stdout ({"event": "ready"|"done"|"error", ...}). Timestamps are
time.monotonic() (CLOCK_MONOTONIC: one clock for every process on the machine).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from infer_side.engines.weights import ModelWeights
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import dtype_from_name
from rlsync.transports.broadcast import BroadcastGroup


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def join_group(spec: dict[str, Any]) -> BroadcastGroup:
    return BroadcastGroup.create(
        master_address="127.0.0.1",
        master_port=spec["port"],
        rank=spec["rank"],
        world_size=spec["world"],
        backend="gloo",
        timeout_s=spec["timeout_s"],
        group_name=spec["group"],
    )


class PerTensor:
    """Allocate, broadcast, load: one tensor at a time."""

    def __init__(self, spec: dict[str, Any]):
        self.store = ModelWeights.empty(ModelConfig(**spec["model"]))
        self.views = self.store.hf_views()
        self.specs = [(n, dtype_from_name(d), tuple(s)) for n, d, s in spec["tensors"]]
        self.group = join_group(spec)

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        recv = load = 0.0
        for name, dtype, shape in self.specs:
            t0 = time.perf_counter()
            t = torch.empty(shape, dtype=dtype)
            self.group.broadcast(t)
            t1 = time.perf_counter()
            self.views[name].copy_(t)
            recv, load = recv + t1 - t0, load + time.perf_counter() - t1
        return {"recv_s": recv, "load_s": load}

    def close(self) -> None:
        self.group.destroy()


class RawBroadcast:
    """One broadcast into one warm buffer."""

    def __init__(self, spec: dict[str, Any]):
        self.buf = torch.zeros(spec["nbytes"], dtype=torch.uint8)
        self.group = join_group(spec)

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.group.broadcast(self.buf)
        return {"recv_s": time.perf_counter() - t0}

    def close(self) -> None:
        self.group.destroy()


class Safetensors:
    """Read a safetensors file tensor by tensor into the store."""

    def __init__(self, spec: dict[str, Any]):
        self.store = ModelWeights.empty(ModelConfig(**spec["model"]))
        self.views = self.store.hf_views()

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        read = load = 0.0
        with safe_open(cmd["path"], framework="pt", device="cpu") as f:
            for name in f.keys():
                t0 = time.perf_counter()
                t = f.get_tensor(name)
                t1 = time.perf_counter()
                self.views[name].copy_(t)
                read, load = read + t1 - t0, load + time.perf_counter() - t1
        return {"recv_s": read, "load_s": load}

    def close(self) -> None:
        pass


METHODS = {"per-tensor": PerTensor, "raw-broadcast": RawBroadcast, "safetensors": Safetensors}


def main(argv: list[str]) -> int:
    return serve_commands(argv, lambda spec: METHODS[spec["method"]](spec))


def serve_commands(
    argv: list[str], make: Callable[[dict[str, Any]], Any], emit: Callable[..., None] = emit
) -> int:
    """A receiver child's life: build its runner from the spec file (argv[0]), say "ready",
    run each JSON command from stdin until "exit", say "done" (or "error") for each."""
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    try:
        runner = make(spec)
    except Exception as exc:
        emit("error", message=f"setup: {type(exc).__name__}: {exc}")
        return 1
    emit("ready")
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("cmd") == "exit":
                break
            with torch.no_grad():
                fields = runner.run(cmd)
            emit("done", t_done=time.monotonic(), rep=cmd.get("rep"), **fields)
    except Exception as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
