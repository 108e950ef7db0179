"""A vLLM engine process for the weight-sync paths people use with vLLM today (the peers that
`rlsync bench sync --engine vllm` sets beside our transports).

    python -m rlsync.bench.vllm_peers SPEC.json

Each peer is a real vLLM 0.32 `LLMEngine` in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
uni executor, as our vLLM backend runs it), so the loads below are the same code paths a
vLLM server runs. It speaks `rlsync.bench.receiver`'s JSON-lines protocol (commands on stdin,
events on stdout, no pickle), so `rlsync.bench.procs.Receivers` bounds every wait and kills
it on failure. Methods (spec["method"]):

- "disk-reload": the trainer wrote a safetensors checkpoint; vLLM reloads it from that path
  (`reload_weights(weights_path=...)`), then the prefix cache is reset.
- "per-tensor": the OpenRLHF way: the trainer broadcasts tensor by tensor over gloo and the
  engine makes one load call per tensor, except that q/k/v and gate/up of a layer go in one
  call: on CPU vLLM's reload path packs a fused layer when it is loaded, and a call holding
  part of a fused group corrupts the model silently (see /work/vproto/NOTES.md, item 6).
- "native": vLLM's weight-transfer API (init_weight_transfer_engine, start_weight_update,
  update_weights, finish_weight_update) with a CPU backend, `GlooWeightTransferEngine`,
  registered here in the engine's process before the engine starts (with the uni executor
  the worker lives in this process, so this module plays the worker extension's part).

Commands: {"cmd": "load", "path"} (disk-reload), {"cmd": "init"} (native: join the group),
{"cmd": "go"} (per-tensor, native: receive one update), {"cmd": "generate", "prompt", "n"}
(greedy token ids), {"cmd": "exit"}. Each update's "done" event carries recv_s (waiting for
bytes), load_s (vLLM's load calls) and flush_s (prefix-cache reset).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlsync.bench.receiver import join_group, serve_commands
from rlsync.plan.buckets import dtype_from_name

BACKEND = "rlsync_gloo"
"""The name our CPU weight-transfer backend is registered under in vLLM's factory."""


def fused_groups(names: list[str]) -> list[list[str]]:
    """Names in load-call groups: q/k/v (weights and biases) of a layer together, gate/up of a
    layer together, every other tensor alone; groups in the order their first name comes."""
    groups: dict[str, list[str]] = {}
    for name in names:
        key = name
        for parts, tag in (
            (("q_proj", "k_proj", "v_proj"), "qkv"),
            (("gate_proj", "up_proj"), "gu"),
        ):
            for part in parts:
                if f".{part}." in name:
                    key = name.replace(f".{part}.", f".{tag}.").rsplit(".", 1)[0]
        groups.setdefault(key, []).append(name)
    return list(groups.values())


# ---------------------------------------------------------------- vLLM's native API, on gloo


@dataclass
class GlooInitInfo:
    """Where the trainer's gloo group is (rank 0 = trainer)."""

    port: int
    rank: int
    world: int
    group: str
    timeout_s: float


@dataclass
class GlooUpdateInfo:
    """One update's tensors, in the order the trainer broadcasts them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def _register_gloo_engine() -> None:
    """Register `GlooWeightTransferEngine` with vLLM's factory (once per process)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """vLLM's NCCL engine (non-packed) with gloo: broadcast a tensor, `load_weights` it,
        inside one layerwise-reload session (fused layers are packed once complete)."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            self.group = join_group(
                {
                    "port": init_info.port,
                    "rank": init_info.rank,
                    "world": init_info.world,
                    "group": init_info.group,
                    "timeout_s": init_info.timeout_s,
                }
            )

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def receive_weights(self, update_info: GlooUpdateInfo) -> None:
            for name, dtype, shape in zip(
                update_info.names, update_info.dtype_names, update_info.shapes, strict=True
            ):
                weight = torch.empty(shape, dtype=dtype_from_name(dtype))
                self.group.broadcast(weight)
                self.model.load_weights([(name, weight)])

        def update_weights(self, update_info: dict[str, Any]) -> None:
            self.receive_weights(self.parse_update_info(update_info))  # no device to sync

        def shutdown(self) -> None:
            group = getattr(self, "group", None)
            if group is not None:
                group.destroy()

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)


# ---------------------------------------------------------------- the peer


def build_engine(spec: dict[str, Any]) -> Any:
    """vLLM's LLMEngine in this process, configured as our vLLM backend configures it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    extra: dict[str, Any] = {}
    if spec["method"] == "native":
        _register_gloo_engine()
        extra["weight_transfer_config"] = {"backend": BACKEND}
    args = EngineArgs(
        model=spec["checkpoint"],
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=True,
        max_model_len=spec.get("max_len", 256),
        skip_tokenizer_init=True,
        distributed_executor_backend="uni",
        max_num_seqs=8,
        block_size=32,
        seed=0,
        **extra,
    )
    return LLMEngine.from_engine_args(args)


class Peer:
    """One vLLM engine and the update path of `spec["method"]`."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.llm = build_engine(spec)
        self.tensors = [(n, dtype_from_name(d), tuple(s)) for n, d, s in spec.get("tensors", [])]
        self.group: Any = None

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        what = cmd["cmd"]
        if what == "generate":
            return {"tokens": self.generate(cmd["prompt"], cmd["n"])}
        if what == "init":  # join the trainer's gloo group (after the slow engine start)
            if self.spec["method"] == "per-tensor":
                self.group = join_group(self.spec)
            else:
                info = {k: self.spec[k] for k in ("port", "rank", "world", "group", "timeout_s")}
                self._rpc("init_weight_transfer_engine", info)
            return {}
        t0 = time.perf_counter()
        if what == "load":
            self._rpc("reload_weights", weights_path=cmd["path"], is_checkpoint_format=True)
            times = {"recv_s": 0.0, "load_s": time.perf_counter() - t0}
        elif self.spec["method"] == "per-tensor":
            times = self._per_tensor()
        else:
            times = self._native()
        t1 = time.perf_counter()
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")
        return {**times, "flush_s": time.perf_counter() - t1}

    def _rpc(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.llm.collective_rpc(method, args=args, kwargs=kwargs or None)

    def _per_tensor(self) -> dict[str, float]:
        """Receive each tensor, one load call per tensor (a fused group per call)."""
        assert self.group is not None
        by_name = {n: (d, s) for n, d, s in self.tensors}
        recv = load = 0.0
        for names in fused_groups([n for n, _, _ in self.tensors]):
            t0 = time.perf_counter()
            got = []
            for name in names:
                t = torch.empty(by_name[name][1], dtype=by_name[name][0])
                self.group.broadcast(t)
                got.append((name, t))
            t1 = time.perf_counter()
            self._rpc("reload_weights", weights_iterator=iter(got), is_checkpoint_format=True)
            recv, load = recv + t1 - t0, load + time.perf_counter() - t1
        return {"recv_s": recv, "load_s": load}

    def _native(self) -> dict[str, float]:
        """One session of vLLM's weight-transfer API (receive and load are interleaved)."""
        t0 = time.perf_counter()
        self._rpc("start_weight_update")
        info = {
            "names": [n for n, _, _ in self.tensors],
            "dtype_names": [d for _, d, _ in self.spec["tensors"]],
            "shapes": [list(s) for _, _, s in self.tensors],
        }
        self._rpc("update_weights", info)
        self._rpc("finish_weight_update")
        return {"recv_s": 0.0, "load_s": time.perf_counter() - t0}

    def generate(self, prompt: list[int], n: int) -> list[int]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, logprobs=None
        )
        rid = f"g{time.monotonic_ns()}"
        self.llm.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        tokens: list[int] = []
        while self.llm.has_unfinished_requests():
            for out in self.llm.step():
                if out.finished:
                    tokens = list(out.outputs[0].token_ids)
        return tokens

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy()
        if self.spec["method"] == "native":
            try:
                self._rpc("shutdown_weight_transfer_engine")
            except Exception:  # closing after a failure: the group may be gone already
                pass


def main(argv: list[str]) -> int:
    # vLLM logs to stdout: keep the real stdout for our events, send everything else to stderr
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: str, **fields: Any) -> None:
        events.write(json.dumps({"event": event, **fields}) + "\n")
        events.flush()

    return serve_commands(argv, Peer, emit)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
