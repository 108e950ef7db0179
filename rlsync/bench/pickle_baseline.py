"""Baseline: the state dict pickled over a ZMQ socket (what `socket.send_pyobj(state_dict)`
does), unpickled by an engine-side receiver and copied into an engine-layout store.

Why this exists: many RL loops move weights this way, and the benchmark must show what it
costs next to our transports. It is the ONLY pickle in the project, and it is fenced in:
- nothing imports this module; the benchmark runs it as its own process
  (`python -m rlsync.bench.pickle_baseline send ...`), which starts its own receivers;
- each receiver unpickles only frames from its own parent, on a private ipc:// endpoint in
  a fresh 0700 directory (`rlsync.wire.endpoints.private_ipc_endpoint`), removed at the end;
- it never touches an engine's socket, and no engine or trainer code path can reach it.

    python -m rlsync.bench.pickle_baseline send --checkpoint DIR --engines N --repeat R
        prints one JSON line: {"seconds": [...], "block_s": [...], "samples": [...]}
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from typing import Any

import torch
import zmq

from rlsync.bench.procs import stop_process
from rlsync.checkpoint_io import iter_checkpoint_tensors
from rlsync.model_config import ModelConfig
from rlsync.procs import child_env
from rlsync.wire.endpoints import private_ipc_endpoint, remove_private_endpoint

EXIT = b"exit"
READY = b"ready"


def _recv(sock: zmq.Socket, timeout_s: float, what: str) -> zmq.Frame:
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise TimeoutError(f"pickle baseline: no {what} within {timeout_s:.0f}s")
    return sock.recv(copy=False)


# ---------------------------------------------------------------- sender (the trainer)


def send(args: argparse.Namespace) -> dict[str, Any]:
    tensors = dict(iter_checkpoint_tensors(args.checkpoint))
    ctx = zmq.Context()
    endpoints = [private_ipc_endpoint(f"pickle{i}") for i in range(args.engines)]
    socks, procs = [], []
    try:
        for ep in endpoints:
            sock = ctx.socket(zmq.PAIR)
            sock.bind(ep)
            socks.append(sock)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "rlsync.bench.pickle_baseline",
                        "receive",
                        "--endpoint",
                        ep,
                        "--checkpoint",
                        args.checkpoint,
                        "--timeout",
                        str(args.timeout),
                    ],
                    stdin=subprocess.DEVNULL,
                    env=child_env(),
                )
            )
        for sock in socks:
            _recv(sock, args.timeout, "receiver ready")
        return _rounds(tensors, socks, args.repeat, args.timeout)
    finally:
        for sock in socks:
            try:
                sock.send(EXIT, zmq.NOBLOCK)
            except zmq.Again:
                pass  # that receiver never connected; it is stopped below
        for proc in procs:
            stop_process(proc, 10.0)
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        for ep in endpoints:
            remove_private_endpoint(ep)


def _rounds(
    tensors: dict[str, torch.Tensor], socks: list[zmq.Socket], repeat: int, timeout_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": [], "block_s": [], "samples": []}
    for rep in range(repeat + 1):  # rep 0 warms up
        t0 = time.monotonic()
        blob = pickle.dumps(tensors, protocol=pickle.HIGHEST_PROTOCOL)
        t_pickled = time.monotonic()
        for sock in socks:
            sock.send(blob, copy=False)
        t_sent = time.monotonic()
        acks = [json.loads(bytes(_recv(s, timeout_s, "ack").buffer)) for s in socks]
        del blob
        if rep:
            out["seconds"].append(max(a["t_done"] for a in acks) - t0)
            out["block_s"].append(t_sent - t0)
            out["samples"].append(
                {
                    "pickle_s": t_pickled - t0,
                    "recv_s": max(a["recv_s"] for a in acks),
                    "load_s": max(a["load_s"] for a in acks),
                }
            )
    return out


# ---------------------------------------------------------------- receiver (the engine side)


def receive(args: argparse.Namespace) -> None:
    from infer_side.engines.weights import ModelWeights

    torch.set_num_threads(1)
    views = ModelWeights.empty(ModelConfig.from_dir(args.checkpoint)).hf_views()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    try:
        sock.connect(args.endpoint)
        sock.send(READY)
        while True:
            frame = _recv(sock, args.timeout * 4, "frame")
            if len(frame) == len(EXIT) and bytes(frame.buffer) == EXIT:
                return
            t0 = time.perf_counter()
            state = pickle.loads(frame.buffer)  # noqa: S301 - our own parent, private endpoint
            t1 = time.perf_counter()
            with torch.no_grad():
                for name, t in state.items():
                    views[name].copy_(t)
            del state, frame
            t2 = time.perf_counter()  # recv_s below is the unpickle: the bytes already arrived
            ack = {"t_done": time.monotonic(), "recv_s": t1 - t0, "load_s": t2 - t1}
            sock.send(json.dumps(ack).encode())
    finally:
        sock.close(linger=1000)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlsync.bench.pickle_baseline")
    parser.add_argument("role", choices=["send", "receive"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--endpoint", default="")
    args = parser.parse_args(argv)
    if args.role == "receive":
        receive(args)
        return 0
    print(json.dumps(send(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
