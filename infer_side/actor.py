"""InferenceActor: a thin Ray actor shell around one engine server process.

The actor starts `python -m infer_side.process.server` through `launch_engine`, reports the endpoint
the engine bound, and forwards generate / info / fingerprint calls to its `EngineClient`.
The weights reach the engine directly from the trainer over that endpoint (the actor is not
in the data path). Every call is bounded by the engine config's call timeout; a dead engine
process raises `EngineDead` here, which Ray hands to the caller.

The class is plain Python; the launcher wraps it with `ray.remote`. It knows nothing about
trainers, PPO or placement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from infer_side.process.client import EngineClient, generate_through_updates, launch_engine
from rlsync.config import EngineConfig
from rlsync.wire.netutil import node_address
from rlsync.wire.protocol import (
    EngineInfo,
    GenerateOutput,
    SamplingParams,
    WeightFingerprints,
    WeightSpecs,
)


def engine_device(device: str) -> str:
    """Under Ray a GPU actor sees only its own GPU(s): any `cuda:N` becomes `cuda`."""
    return "cuda" if device.startswith("cuda") else device


class InferenceActor:
    """One engine: started in __init__, stopped by `close` (or when the actor dies)."""

    def __init__(
        self,
        name: str,
        model_dir: str,
        cfg: dict[str, Any],
        endpoint: str | None = None,
        threads: int | None = 1,
        auth_keys: str | None = None,
    ) -> None:
        """`endpoint` None: the config's (default: a private ipc:// socket); "{host}" in it
        becomes this node's address, e.g. "tcp://{host}:*" for a cross-node engine.
        `auth_keys`: a `rlsync.wire.auth` key directory; the engine then accepts CURVE clients only."""
        self.name = name
        self.cfg = EngineConfig(**cfg)
        if endpoint is not None and "{host}" in endpoint:
            endpoint = endpoint.format(host=node_address())
        extra = ["--max-running", str(self.cfg.max_running)]
        extra += ["--load-chunk-mb", str(self.cfg.load_chunk_mb)]
        extra += [] if self.cfg.expose_weights else ["--private-weights"]
        self.client: EngineClient | None = launch_engine(
            model_dir,
            endpoint=endpoint or self.cfg.endpoint,
            kv_tokens=self.cfg.kv_tokens,
            backend=self.cfg.backend,
            device=engine_device(self.cfg.device),
            dtype=self.cfg.dtype,
            threads=threads,
            extra_args=extra,
            start_timeout_s=self.cfg.start_timeout_s,
            call_timeout_s=self.cfg.call_timeout_s,
            auth_keys=auth_keys,
            disk_root=self.cfg.disk_root,
        )

    def _engine(self) -> EngineClient:
        if self.client is None:
            raise RuntimeError(f"engine {self.name} is closed")
        return self.client

    def endpoint(self) -> str:
        """The endpoint the engine bound (a tcp://host:* request comes back with its port)."""
        return self._engine().endpoint

    def node_address(self) -> str:
        return node_address()

    def pids(self) -> dict[str, int]:
        """This actor's pid and the engine process's pid (for diagnostics and failure tests)."""
        proc = self._engine().process
        return {"actor": os.getpid(), "engine": proc.pid if proc is not None else -1}

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerateOutput]:
        """One finished output per prompt, in order; each names the weight version it used."""
        return self._engine().generate(prompts, sampling, timeout_s=self.cfg.call_timeout_s)

    def generate_timed(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
    ) -> tuple[list[GenerateOutput], float]:
        """`generate`, and the seconds it took here (the engine's busy time for the batch,
        free of the caller's queueing: the RL loop's idle-fraction metric). Requests that
        reach the engine while an in_place push writes its weights are sent again after it."""
        t0 = time.perf_counter()
        outputs = generate_through_updates(
            self._engine(), prompts, sampling, self.cfg.call_timeout_s
        )
        return outputs, time.perf_counter() - t0

    def info(self) -> EngineInfo:
        return self._engine().info()

    def fingerprints(self) -> WeightFingerprints:
        """Every tensor's fingerprint and the weight version."""
        return self._engine().fingerprints()

    def weight_specs(self) -> WeightSpecs:
        return self._engine().weight_specs()

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        return self._engine().stderr_tail(max_bytes)

    def close(self) -> None:
        """Stop the engine process (Shutdown, then terminate); safe to call twice."""
        if self.client is not None:
            self.client.close()
            self.client = None
