"""Our own engine's core: model + KV pool + prefix cache + scheduler, behind the messages and
the update machine every backend shares (`infer_side.engines.core_base`). Driving loop, outbox and
the empty_cache rule are described there; this module adds only what is ours: a paged KV pool
with a radix prefix cache, continuous batching, and weights the update machine can write in
place (their HF-named views are zero-copy views of the fused storage the model computes with).
"""

from __future__ import annotations

from pathlib import Path

import torch

from infer_side.engines.core_base import CoreBase, release_cuda_cache
from infer_side.engines.native.forward_batch import ForwardBatch
from infer_side.engines.native.kv_pool import KVPool
from infer_side.engines.native.model import LlamaForInference
from infer_side.engines.native.radix_cache import RadixCache
from infer_side.engines.native.scheduler import Scheduler
from infer_side.engines.request import Request
from infer_side.engines.weights import ModelWeights
from rlsync.config import EngineConfig
from rlsync.model_config import ModelConfig
from rlsync.transports import disk
from rlsync.wire.protocol import PAUSE_MODES, EngineInfo, GenerateOutput, PauseMode

__all__ = ["EngineCore", "release_cuda_cache"]


class EngineCore(CoreBase):
    """One of our engines in-process. See `infer_side.engines.core_base` for the driving loop."""

    def __init__(self, model_cfg: ModelConfig, weights: ModelWeights, engine_cfg: EngineConfig):
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.model = LlamaForInference(model_cfg, weights)
        self.device = weights.device
        self.kv_pool = KVPool.create(
            model_cfg,
            engine_cfg.kv_tokens,
            weights.dtype,
            weights.device,
            max_requests=engine_cfg.max_running,
        )
        self.prefix_cache = RadixCache(self.kv_pool.allocator)
        self.scheduler = Scheduler(
            self.kv_pool,
            self.prefix_cache,
            self._forward,
            engine_cfg.max_running,
            engine_cfg.max_prefill_tokens,
        )
        super().__init__()
        self.disk_receiver = disk.Receiver(engine_cfg.disk_root)
        """Disk updates load only under engine_cfg.disk_root (its default: the temp dir)."""
        self.updates.receivers[disk.Receiver.kind] = self.disk_receiver

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, engine_cfg: EngineConfig, *, exposed: bool = False
    ) -> EngineCore:
        """`exposed`: weight stores a pusher in another process can map; the server sets it
        from `engine_cfg.expose_weights` (an in-process core is pushed to by nobody)."""
        from infer_side.engines.checkpoint import load_model

        model_cfg, weights = load_model(
            path, dtype=engine_cfg.dtype, device=engine_cfg.device, exposed=exposed
        )
        return cls(model_cfg, weights, engine_cfg)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.forward(batch, self.kv_pool.k, self.kv_pool.v)

    # ------------------------------------------------------------------ generation hooks

    def _add(self, req: Request) -> None:
        self.scheduler.add(req)

    def _step(self, admit: bool) -> list[GenerateOutput]:
        return self.scheduler.step(self.weight_version, admit=admit)

    def _in_flight(self, request_id: str) -> bool:
        return self.scheduler.get(request_id) is not None

    def _token_capacity(self) -> int:
        return self.kv_pool.size

    def abort(self, request_id: str) -> bool:
        """Finish one waiting or running request with reason "abort"; False if unknown."""
        out = self.scheduler.abort(request_id, self.weight_version)
        if out is not None:
            self._outbox.append(out)
        return out is not None

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        return self.scheduler.counts()

    def pause(self, mode: PauseMode) -> None:
        """abort: finish everything with "abort"; retract: running -> front of the queue, KV
        freed; in_place: keep everything. In all modes no step runs until continue. Abort
        outputs go out with the next process()/step() return."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {list(PAUSE_MODES)}")
        if mode == "abort":
            self._outbox.extend(self.scheduler.abort_all(self.weight_version))
        elif mode == "retract":
            self.scheduler.retract_all()
        self.paused = mode

    # ------------------------------------------------------------------ cache

    def flush_cache(self, empty_cache: bool = True) -> tuple[bool, str]:
        """Reset prefix cache, request table and allocator, only when fully idle."""
        waiting, running = self.counts()
        if waiting or running:
            return False, (
                f"cache not flushed: {waiting} waiting and {running} running requests in flight"
            )
        self.reset_kv(empty_cache)
        return True, "cache flushed"

    def reset_kv(self, empty_cache: bool) -> None:
        """The reset part of a flush; raises if a running request still holds KV."""
        self.scheduler.reset_kv()
        release_cuda_cache(self.device, empty_cache)

    def flush_kv(self, empty_cache: bool) -> None:
        """After a weight update no KV computed with the old weights may be reused, not even by
        the requests that computed it: running ones (an in_place pause) keep their tokens but
        give up their KV, recomputed with the new weights when they resume; then the pool is
        reset. So every token is computed by exactly the version its span names."""
        self.scheduler.recompute_all()
        self.reset_kv(empty_cache)

    # ------------------------------------------------------------------ weights (engine_api)

    def live_weights(self) -> ModelWeights:
        return self.model.weights

    def new_shadow(self) -> ModelWeights:
        return self.model.weights.clone_empty()

    def stream_sink(self, store: ModelWeights) -> None:
        """None: the views write the model's own storage, nothing more to do per bucket."""
        return None

    def apply_weights(self, store: ModelWeights) -> None:  # type: ignore[override]
        """Compute with `store` from the next step on (the live store itself after an
        in_place update: its views already wrote the model's storage)."""
        self.model.weights = store

    def info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        return self._info(
            kv_pool_size=self.kv_pool.size,
            kv_pool_used=self.kv_pool.used,
            prefix_cache_tokens=self.prefix_cache.num_tokens,
            retracted=self.scheduler.num_retracted,
            disk_root=str(self.disk_receiver.root),
        )
