"""What every engine backend's core shares: typed messages in, replies out, one outbox, and
the weight-update machine beside it. A plain class, no sockets and no threads: the ZMQ server
process (and tests) drive any backend with

    replies = core.process(msg)        # one incoming message -> immediate replies
    while core.has_work():
        outputs = core.step()          # one generation step -> outputs + deferred replies

Every reply goes through one outbox, so outputs made outside a step (aborts from a pause that
a weight update triggered, say) still reach the caller with the next `process()` or `step()`.
Weight messages go to `self.updates` (`infer_side.update.update_machine`), which reaches the backend
only through `infer_side.update.engine_api.UpdatableEngine`; the core asks it whether generation is
blocked (weights incomplete, admission held). A backend implements the generation hooks
(`_add`, `_step`, `abort`, `counts`, `pause`, ...) and the weight hooks of the interface.

Cache rule (SGLang PR #22998): `flush_cache` empties the CUDA caching allocator only when
asked, and only on CUDA, because `torch.cuda.empty_cache()` synchronizes every stream and
stalls concurrent inference; the weight-update path passes `torch_empty_cache` (default off).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from infer_side.engines.request import Request, error_output
from infer_side.update.update_machine import UpdateMachine
from rlsync.model_config import ModelConfig
from rlsync.wire.protocol import (
    PAUSE_MODES,
    WEIGHTS_INCOMPLETE,
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


class CoreBase:
    """Message handling and the update machine; subclasses are the engine backends."""

    model_cfg: ModelConfig
    device: torch.device

    def __init__(self) -> None:
        self.weight_version = 0
        self.paused: PauseMode | None = None
        self.shutdown_requested = False
        self._outbox: list[Message] = []
        self.updates = UpdateMachine(self)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the two entry points

    def process(self, msg: Message) -> list[Message]:
        """Handle one message; returns its immediate replies (never raises on bad input)."""
        handler = self._handlers().get(type(msg))
        if handler is not None:
            self._outbox.extend(handler(msg))
        elif self.updates.handles(msg):
            self._outbox.extend(self.updates.process(msg))
        else:
            text = f"{type(msg).__name__}: not a request"
            self._outbox.append(Result(request_id=msg.request_id, success=False, message=text))
        return self._drain()

    def step(self) -> list[Message]:
        """One generation step (unless paused or weights are incomplete), then the update
        machine advances."""
        if self._generating():
            self._outbox.extend(self._step(admit=not self.updates.admission_held))
        self._outbox.extend(self.updates.poll())
        return self._drain()

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

    def close(self) -> None:
        """Release what weight sync holds (groups, mapped buffers); cancel a receive."""
        self.updates.close()

    def _generating(self) -> bool:
        return self.paused is None and not self.updates.weights_incomplete

    def _drain(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------------ handlers

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
        self._add(Request.from_message(req))
        return None

    def _check_generate(self, req: Generate) -> str | None:
        if self.updates.weights_incomplete:
            version = self.updates.incoming_version()
            return f"{WEIGHTS_INCOMPLETE}: update to version {version} in progress"
        if not req.request_id:
            return "request_id: must not be empty"
        if self._in_flight(req.request_id):
            return f"request_id: {req.request_id!r} is already in flight"
        error = check_sampling(req.sampling)
        return error or check_prompt(req, self.model_cfg, self._token_capacity())

    def is_idle(self) -> bool:
        """Nothing for a step to do: no running request, and no waiting one that may be
        admitted (waiting requests held while an update waits for idle hold no KV and do not
        count). `flush_cache` asks for more: no waiting requests at all."""
        waiting, running = self.counts()
        return running == 0 and (waiting == 0 or self.updates.admission_held)

    def continue_generation(self) -> None:
        self.paused = None

    def paused_mode(self) -> PauseMode | None:
        """The pause in force (None: generating)."""
        return self.paused

    def _info(self, **fields: Any) -> EngineInfo:
        waiting, running = self.counts()
        return EngineInfo(
            weight_version=self.weight_version,
            model=dataclasses.asdict(self.model_cfg),
            waiting=waiting,
            running=running,
            paused=self.paused,
            weights_incomplete=self.updates.weights_incomplete,
            admission_held=self.updates.admission_held,
            **fields,
        )

    # ------------------------------------------------------------------ backend hooks

    def _add(self, req: Request) -> None:
        raise NotImplementedError

    def _step(self, admit: bool) -> list[GenerateOutput]:
        raise NotImplementedError

    def _in_flight(self, request_id: str) -> bool:
        raise NotImplementedError

    def _token_capacity(self) -> int:
        """Most tokens (prompt + output) one request may hold."""
        raise NotImplementedError

    def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        raise NotImplementedError

    def pause(self, mode: PauseMode) -> None:
        raise NotImplementedError

    def flush_cache(self, empty_cache: bool = True) -> tuple[bool, str]:
        raise NotImplementedError

    def info(self) -> EngineInfo:
        raise NotImplementedError


def check_prompt(req: Generate, cfg: ModelConfig, capacity: int) -> str | None:
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
    if total > capacity:
        return (
            f"sampling.max_new_tokens: prompt ({len(ids)}) + max_new_tokens ({max_new}) "
            f"exceeds the KV pool ({capacity} tokens)"
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
