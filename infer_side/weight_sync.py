"""Engine side of weight sync: accept an update, receive it, and make it live without ever
serving a half-updated model.

The engine core routes InitWeightsGroup, DestroyWeightsGroup, UpdateWeightsFrom* and
GetWeightsFingerprint here. Every update gets two Results with its request id: one when the
plan is validated (`payload.stage == "accepted"`, or a failure that changed nothing) and one
when it is done. Between them the engine loop keeps running: the bytes arrive on a worker
thread (see `receive.py`) and `poll()` advances the job one stage per loop iteration.
"""

from __future__ import annotations

import time
from typing import Any

from infer_side import receive
from infer_side.update_job import UpdateJob, reply
from infer_side.weights import ModelWeights
from rlsync.protocol import (
    DestroyWeightsGroup,
    GetWeightsFingerprint,
    InitWeightsGroup,
    Message,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC,
)

WORKER_GRACE_S = 5.0


class WeightSync:
    """Owns the engine's weight groups, IPC receivers, shadow copy and the update in flight."""

    def __init__(self, core: Any):
        self.core = core
        self.links = receive.Links()
        self.shadow: ModelWeights | None = None
        self.job: UpdateJob | None = None

    # ------------------------------------------------------------ entry points (loop thread)

    def process(self, msg: Message) -> list[Message]:
        try:
            if isinstance(msg, InitWeightsGroup):
                self.links.start_join(msg)  # the rendezvous waits on a worker thread
                return []
            if isinstance(msg, DestroyWeightsGroup):
                found = self.links.destroy_group(msg.group_name)
                return [reply(msg, found, "destroyed" if found else f"no group {msg.group_name!r}")]
            if isinstance(msg, GetWeightsFingerprint):
                return [self._fingerprints(msg)]
            return self._accept(msg)
        except Exception as exc:  # a bad request is answered, never fatal to the loop
            return [reply(msg, False, f"{type(msg).__name__}: {type(exc).__name__}: {exc}")]

    def poll(self) -> list[Message]:
        """Answer finished group joins and advance the update in flight by at most one stage.
        Between updates, now and then, unmap IPC buffers whose pusher has closed them."""
        out: list[Message] = [reply(msg, ok, text) for msg, ok, text in self.links.finished_joins()]
        if self.job is None:
            if self.links.check_due():
                self.links.release_stale()
            return out
        return out + self._advance(self.job)

    def busy(self) -> bool:
        """True when the loop must call poll(): not while workers are still waiting."""
        job = self.job
        if self.links.join_done():
            return True
        if job is None:
            return self.links.check_due()
        return job.stage != "receiving" or job.done_event.is_set()

    def receiving(self) -> bool:
        """True while a worker thread is receiving an update (the loop should poll often)."""
        return self.job is not None and self.job.stage == "receiving"

    def close(self) -> None:
        self.links.close()

    # ------------------------------------------------------------ accept

    def _accept(self, msg: Any) -> list[Message]:
        """Validate the whole update before a byte arrives; refuse with nothing changed."""
        if self.job is not None:
            raise RuntimeError(f"update to version {self.job.version} still in progress")
        if msg.weight_version <= self.core.weight_version:
            raise ValueError(f"weight_version {msg.weight_version} is not newer than the "
                             f"loaded version {self.core.weight_version}")
        live = self.core.model.weights
        kind, nbytes = receive.validate(msg, live, self.links)
        self.job = job = UpdateJob(msg=msg, kind=kind, nbytes=nbytes)
        if msg.load_mode == "shadow":
            if self.shadow is None:
                self.shadow = live.clone_empty()
            job.start_worker(self._receiver(self.shadow))
        return [reply(msg, True, "accepted", stage="accepted", bytes=nbytes)]

    def _receiver(self, target: ModelWeights) -> Any:
        return lambda job: receive.receive(job, target, self.links)

    # ------------------------------------------------------------ the update order

    def _advance(self, job: UpdateJob) -> list[Message]:
        """The weight-update order, one stage per call (the loop runs between calls):

        in_place: wait for idle or pause per mode -> mark weights incomplete -> receive and
                  load into the live weights -> flush -> set version -> resume.
        shadow:   receive and load into the shadow copy while generation goes on -> wait for
                  idle or pause per mode -> swap -> flush -> set version -> resume.
        A failed shadow update leaves the old weights serving untouched; a failed in-place
        update that already wrote a bucket leaves `weights_incomplete` set (generate refused)
        until a whole update lands.
        """
        if job.stage == "waiting" and self._block_generation(job):
            self.core.weights_incomplete = True
            self.core.pending_weight_version = job.version
            job.start_worker(self._receiver(self.core.model.weights))
        elif job.stage == "receiving" and job.waited_s() > job.msg.timeout_s + job.msg.idle_timeout_s + WORKER_GRACE_S:
            job.error, job.stage = f"receive did not finish in {job.msg.timeout_s:.1f}s", "failed"
        elif job.stage == "received":
            if job.msg.load_mode == "in_place" or self._block_generation(job):
                return self._commit(job)
        if job.stage == "failed":
            return self._fail(job)
        return []

    def _block_generation(self, job: UpdateJob) -> bool:
        """Stop generation per the request's pause mode, or wait (bounded) for idle."""
        core, mode = self.core, job.msg.pause_mode
        if mode is not None:
            if core.paused_mode() is None:
                core.pause(mode)
                job.paused = True
            job.block_started = job.block_started or time.perf_counter()
            return True
        core.hold_admission = True
        if core.is_idle():
            job.block_started = job.block_started or time.perf_counter()
            return True
        if job.waited_s() > job.msg.idle_timeout_s:
            waiting, running = core.counts()
            job.error = (f"engine not idle after {job.msg.idle_timeout_s:.1f}s "
                         f"(waiting={waiting}, running={running}); set pause_mode to preempt")
            job.stage = "failed"
        return False

    def _commit(self, job: UpdateJob) -> list[Message]:
        core, msg = self.core, job.msg
        start = time.perf_counter()
        if msg.load_mode == "shadow":
            core.model.weights, self.shadow = self.shadow, core.model.weights
        if msg.flush_cache:
            self._flush(msg.torch_empty_cache)
        core.weight_version = msg.weight_version
        core.weights_incomplete = False
        job.timings["flush_s"] = time.perf_counter() - start
        return self._finish(job, True, f"loaded version {msg.weight_version}")

    def _flush(self, torch_empty_cache: bool) -> None:
        """No KV computed with the old weights may be reused: reset the pool when no request
        holds KV, else (in_place pause) cut the prefix cache loose so nothing new matches it."""
        _, running = self.core.counts()
        if running == 0:
            self.core.reset_kv(empty_cache=torch_empty_cache)
        else:
            self.core.invalidate_prefix_cache()
            from infer_side.engine_core import release_cuda_cache  # engine_core imports us
            release_cuda_cache(self.core.device, torch_empty_cache)

    def _fail(self, job: UpdateJob) -> list[Message]:
        if job.msg.load_mode == "in_place" and job.timings.get("buckets_loaded", 0) == 0:
            self.core.weights_incomplete = False  # nothing was written: the old weights stand
        if job.kind == "broadcast":  # a failed collective leaves the group unusable
            self.links.destroy_group(job.msg.group_name)
        return self._finish(job, False, f"update to version {job.version} failed: {job.error}")

    def _finish(self, job: UpdateJob, ok: bool, text: str) -> list[Message]:
        payload = job.result_payload(self.core.weight_version)
        if job.paused:
            self.core.continue_generation()
        self.core.hold_admission = False
        self.job = None
        return [reply(job.msg, ok, text, **payload, weights_incomplete=self.core.weights_incomplete)]

    # ------------------------------------------------------------ fingerprints

    def _fingerprints(self, msg: GetWeightsFingerprint) -> Message:
        """Per-tensor fingerprints (names=[] gives none) and the specs an update must match."""
        weights = self.core.model.weights
        specs = {n: [d, list(s)] for n, (d, s) in weights.expected().items()}
        prints = weights.fingerprints(msg.names) if msg.names != [] else {}
        return reply(msg, True, "ok", weight_version=self.core.weight_version, specs=specs,
                     fingerprints=prints, weights_incomplete=self.core.weights_incomplete,
                     update_in_progress=self.job is not None)


UPDATE_TYPES = (UpdateWeightsFromDistributed, UpdateWeightsFromIPC, UpdateWeightsFromDisk)
