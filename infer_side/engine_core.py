"""The engine's in-process core: model + KV pool + prefix cache + scheduler behind typed messages.

A plain class, no sockets and no threads: the ZMQ server process (and tests) drive it with

    replies = core.process(msg)        # one incoming message -> immediate replies
    while core.has_work():
        outputs = core.step()          # one scheduler step -> outputs + deferred Results

Every message that produces a reply goes through one outbox, so outputs created outside a
step (aborts from a pause that weight sync triggered, say) still reach the caller with the
next `process()` or `step()` return. Weight messages go to `self.updates` (the update state
machine), which reaches this core only through `infer_side.engine_api.UpdatableEngine`; the
core asks it whether generation is blocked (weights incomplete, admission held).

Cache rule (SGLang PR #22998): `flush_cache` empties the CUDA caching allocator only when
asked, and only on CUDA, because `torch.cuda.empty_cache()` synchronizes every stream and
stalls concurrent inference; the weight-update path passes `torch_empty_cache` (default off).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from infer_side.forward_batch import ForwardBatch
from infer_side.kv_pool import KVPool
from infer_side.model import LlamaForInference
from infer_side.radix_cache import RadixCache
from infer_side.request import Request, error_output
from infer_side.scheduler import Scheduler
from infer_side.update_machine import UpdateMachine
from infer_side.weights import ModelWeights
from rlsync.config import EngineConfig
from rlsync.model_config import ModelConfig
from rlsync.protocol import (
    PAUSE_MODES,
    Abort,
    ContinueGeneration,
    EngineInfo,
    FlushCache,
    Generate,
    GenerateOutput,
    GetInfo,
    Message,
    PauseGeneration,
    PauseMode,
    Result,
    SamplingParams,
    Shutdown,
)


def release_cuda_cache(device: torch.device, empty_cache: bool) -> bool:
    """Call torch.cuda.empty_cache() iff asked and the engine runs on CUDA; returns whether."""
    if not empty_cache or device.type != "cuda":
        return False
    torch.cuda.empty_cache()
    return True


class EngineCore:
    """One inference engine in-process. See the module docstring for the driving loop."""

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
        self.weight_version = 0
        self.paused: PauseMode | None = None
        self.shutdown_requested = False
        self._outbox: list[Message] = []
        self.updates = UpdateMachine(self)

    @classmethod
    def from_checkpoint(cls, path: str | Path, engine_cfg: EngineConfig) -> EngineCore:
        from infer_side.checkpoint import load_model

        model_cfg, weights = load_model(path, dtype=engine_cfg.dtype, device=engine_cfg.device)
        return cls(model_cfg, weights, engine_cfg)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.forward(batch, self.kv_pool.k, self.kv_pool.v)

    # ------------------------------------------------------------------ the two entry points

    def process(self, msg: Message) -> list[Message]:
        """Handle one message; returns its immediate replies (never raises on bad input)."""
        handler = self._handlers().get(type(msg))
        if handler is not None:
            self._outbox.extend(handler(msg))
        elif self.updates.handles(msg):
            self._outbox.extend(self.updates.process(msg))
        else:
            self._outbox.append(
                Result(
                    request_id=msg.request_id,
                    success=False,
                    message=f"{type(msg).__name__}: not a request",
                )
            )
        return self._drain()

    def step(self) -> list[Message]:
        """One scheduler step (unless paused or weights are incomplete), then the update
        machine advances."""
        if self._generating():
            self._outbox.extend(
                self.scheduler.step(self.weight_version, admit=not self.updates.admission_held)
            )
        self._outbox.extend(self.updates.poll())
        return self._drain()

    def _generating(self) -> bool:
        return self.paused is None and not self.updates.weights_incomplete

    def has_work(self) -> bool:
        """Whether step() has anything to do: outputs to hand out, a weight update to advance,
        or requests to run (unless paused or the weights are incomplete)."""
        if self._outbox or self.updates.busy():
            return True
        return self._generating() and not self.is_idle()

    def idle_wait_ms(self) -> int:
        """How long the server may sleep in its socket when there is no work; 0 while a weight
        update arrives on its worker thread (then it waits on `wait_for_update` in turns)."""
        return 0 if self.updates.receiving() else 50

    def wait_for_update(self, timeout_s: float) -> None:
        """Block until the update's worker finished, at most `timeout_s`."""
        self.updates.wait(timeout_s)

    def _drain(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def _handlers(self) -> dict[type, Callable[[Any], list[Message]]]:
        return {
            Generate: self._on_generate,
            Abort: self._on_abort,
            FlushCache: self._on_flush,
            PauseGeneration: self._on_pause,
            ContinueGeneration: self._on_continue,
            GetInfo: self._on_info,
            Shutdown: self._on_shutdown,
        }

    def _on_generate(self, msg: Generate) -> list[Message]:
        error = self.generate(msg)
        return [error] if error is not None else []

    def _on_abort(self, msg: Abort) -> list[Message]:
        found = self.abort(msg.target_id)
        return [_result(msg, found, "" if found else f"request {msg.target_id!r} not in flight")]

    def _on_flush(self, msg: FlushCache) -> list[Message]:
        return [_result(msg, *self.flush_cache(msg.empty_cache))]

    def _on_pause(self, msg: PauseGeneration) -> list[Message]:
        if msg.mode not in PAUSE_MODES:
            return [_result(msg, False, f"mode: {msg.mode!r} is not one of {list(PAUSE_MODES)}")]
        self.pause(msg.mode)
        return [_result(msg, True, f"paused ({msg.mode})")]

    def _on_continue(self, msg: ContinueGeneration) -> list[Message]:
        self.continue_generation()
        return [_result(msg, True, "")]

    def _on_info(self, msg: GetInfo) -> list[Message]:
        return [dataclasses.replace(self.info(), request_id=msg.request_id)]

    def _on_shutdown(self, msg: Shutdown) -> list[Message]:
        self.shutdown_requested = True
        return [_result(msg, True, "shutting down")]

    # ------------------------------------------------------------------ requests

    def generate(self, req: Generate) -> GenerateOutput | None:
        """Queue a Generate; returns an error output (and changes nothing) if it is invalid."""
        error = self._check_generate(req)
        if error:
            return error_output(req.request_id, error)
        self.scheduler.add(Request.from_message(req))
        return None

    def _check_generate(self, req: Generate) -> str | None:
        if self.updates.weights_incomplete:
            return (
                f"weights incomplete: update to version {self.updates.incoming_version()} "
                "in progress"
            )
        if not req.request_id:
            return "request_id: must not be empty"
        if self.scheduler.get(req.request_id) is not None:
            return f"request_id: {req.request_id!r} is already in flight"
        return check_sampling(req.sampling) or check_prompt(req, self.model_cfg, self.kv_pool.size)

    def abort(self, request_id: str) -> bool:
        """Finish one waiting or running request with reason "abort"; False if unknown."""
        out = self.scheduler.abort(request_id, self.weight_version)
        if out is not None:
            self._outbox.append(out)
        return out is not None

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        return self.scheduler.counts()

    def is_idle(self) -> bool:
        """Nothing for a step to do: no running request, and no waiting one that may be
        admitted (waiting requests held while an update waits for idle hold no KV and do not
        count). `flush_cache` asks for more: no waiting requests at all."""
        waiting, running = self.counts()
        return running == 0 and (waiting == 0 or self.updates.admission_held)

    # ------------------------------------------------------------------ control

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
        """After a weight update no KV computed with the old weights may be reused: reset
        the pool when no request holds KV, else (in_place pause) cut the prefix cache loose
        so nothing new matches it."""
        _, running = self.counts()
        if running == 0:
            self.reset_kv(empty_cache)
        else:
            self.prefix_cache.invalidate()
            release_cuda_cache(self.device, empty_cache)

    # ------------------------------------------------------------------ weights (engine_api)

    def live_weights(self) -> ModelWeights:
        return self.model.weights

    def new_shadow(self) -> ModelWeights:
        return self.model.weights.clone_empty()

    def swap_weights(self, store: ModelWeights) -> ModelWeights:  # type: ignore[override]
        old, self.model.weights = self.model.weights, store
        return old

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

    def continue_generation(self) -> None:
        self.paused = None

    def paused_mode(self) -> PauseMode | None:
        """The pause in force (None: generating)."""
        return self.paused

    def info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        waiting, running = self.counts()
        return EngineInfo(
            weight_version=self.weight_version,
            model=dataclasses.asdict(self.model_cfg),
            kv_pool_size=self.kv_pool.size,
            kv_pool_used=self.kv_pool.used,
            prefix_cache_tokens=self.prefix_cache.num_tokens,
            waiting=waiting,
            running=running,
            paused=self.paused,
            weights_incomplete=self.updates.weights_incomplete,
            admission_held=self.updates.admission_held,
            retracted=self.scheduler.num_retracted,
        )


def check_prompt(req: Generate, cfg: ModelConfig, pool_size: int) -> str | None:
    """Why this prompt cannot run here (naming the field), or None."""
    ids, max_new = req.input_ids, req.sampling.max_new_tokens
    if not ids:
        return "input_ids: empty prompt"
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        return f"input_ids[{bad}]: token id {ids[bad]} outside [0, {cfg.vocab_size})"
    total = len(ids) + max_new
    if total > cfg.max_position_embeddings:
        return (
            f"sampling.max_new_tokens: prompt ({len(ids)}) + max_new_tokens ({max_new}) "
            f"exceeds max_position_embeddings ({cfg.max_position_embeddings})"
        )
    if total > pool_size:
        return (
            f"sampling.max_new_tokens: prompt ({len(ids)}) + max_new_tokens ({max_new}) "
            f"exceeds the KV pool ({pool_size} tokens)"
        )
    return None


def check_sampling(p: SamplingParams) -> str | None:
    """Range checks the codec does on the wire, repeated for in-process callers."""
    if not (math.isfinite(p.temperature) and p.temperature >= 0):
        return f"sampling.temperature: must be a finite number >= 0, got {p.temperature}"
    if not 0 <= p.top_p <= 1:
        return f"sampling.top_p: must be in [0, 1], got {p.top_p}"
    if p.top_k < 0:
        return f"sampling.top_k: must be >= 0, got {p.top_k}"
    if p.max_new_tokens < 1:
        return f"sampling.max_new_tokens: must be >= 1, got {p.max_new_tokens}"
    return None


def _result(msg: Message, success: bool, message: str) -> Result:
    return Result(request_id=msg.request_id, success=success, message=message)
