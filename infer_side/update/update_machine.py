"""The weight-update state machine: accept an update, receive it, make it live, and never
serve a half-updated model. Engine-agnostic: it reaches the engine only through
`infer_side.update.engine_api.UpdatableEngine` and the bytes only through the transport receivers
of `rlsync.transports.registry`.

Every update gets two replies with its request id: `UpdateAccepted` once the whole update
is validated (or an `UpdateDone` failure that changed nothing), then `UpdateDone`; an atomic
update gets `UpdateReady` between them. Between
them the engine loop keeps running: bytes arrive on a worker thread, and `poll()` advances
the job at most one stage per loop iteration. Only the loop thread moves stages; the worker
only writes through its `WeightWriter` and signals `done`.

    in_place:  WAITING --(pause per mode, or idle)--> RECEIVING (into the live store, generate
               refused: "weights incomplete") --> RECEIVED --> COMMITTED
    shadow:    RECEIVING (into the shadow store while generation goes on) --> RECEIVED
               --(pause per mode, or idle)--> COMMITTED (swap between two steps)
    atomic:    shadow, but RECEIVED --(pause_mode None: wait for idle, then hold admission)-->
               READY (UpdateReady sent) --CommitUpdate, (pause per mode)--> COMMITTED;
               READY --AbortUpdate, or commit_timeout_s without either--> FAILED (discarded)
    commit:    [swap] -> flush KV (empty_cache only if asked) -> set version -> resume
    any stage --> FAILED: a shadow failure leaves the old weights serving untouched; an
               in_place failure that touched the live store leaves generation refused until a
               whole update lands. A receive that overruns its bounds (or an AbortUpdate
               while it runs) is cancelled: its writer stops, and a shadow store it could
               still write is dropped.
"""

from __future__ import annotations

import time

from infer_side.update.engine_api import EngineWeights, UpdatableEngine
from infer_side.update.update_job import PlanCache, Stage, UnknownPlan, UpdateJob
from rlsync.plan.buckets import in_store
from rlsync.transports import registry
from rlsync.transports.base import Receiver
from rlsync.wire.protocol import (
    AbortUpdate,
    BucketPlan,
    BucketUpdate,
    CommitUpdate,
    GetWeightsFingerprint,
    GetWeightSpecs,
    Message,
    Result,
    UpdateAccepted,
    UpdateDone,
    UpdateReady,
    UpdateWeights,
    WeightFingerprints,
    WeightSpec,
    WeightSpecs,
)

WORKER_GRACE_S = 5.0
"""Past 2 * timeout_s (accepts, then the first bucket) + idle_timeout_s + this, the
watchdog cancels a receive."""


class UpdateMachine:
    """Owns the update in flight, the shadow store, the transport receivers, the validated
    plans and the gating state the engine asks about."""

    def __init__(self, engine: UpdatableEngine):
        self.engine = engine
        self.receivers: dict[str, Receiver] = {}
        self.plans = PlanCache()
        self.shadow: EngineWeights | None = None
        self.job: UpdateJob | None = None
        self.abandoned: UpdateJob | None = None
        """A cancelled job whose worker may still be running (mid-copy, or inside its
        receiver): no update starts until it has stopped."""
        self.weights_incomplete = False
        """The live store holds part of an update: generation is refused, no step runs."""
        self.admission_held = False
        """Waiting for idle: waiting requests stay waiting."""
        self.pending_version: int | None = None

    # ------------------------------------------------------------ entry points (loop thread)

    def handles(self, msg: Message) -> bool:
        return (
            isinstance(
                msg,
                (UpdateWeights, CommitUpdate, AbortUpdate, GetWeightsFingerprint, GetWeightSpecs),
            )
            or registry.control_owner(msg) is not None
        )

    def process(self, msg: Message) -> list[Message]:
        """Immediate replies to one weight message; a bad one is answered, never fatal."""
        try:
            if isinstance(msg, UpdateWeights):
                return [self._accept(msg)]
            if isinstance(msg, CommitUpdate):
                return self._on_commit(msg)
            if isinstance(msg, AbortUpdate):
                return self._on_abort(msg)
            if isinstance(msg, GetWeightsFingerprint):
                return [self._fingerprints(msg)]
            if isinstance(msg, GetWeightSpecs):
                return [self._specs(msg)]
            return self._receiver(registry.control_owner(msg)).handle(msg)
        except UnknownPlan as exc:
            return [
                UpdateDone(
                    request_id=msg.request_id,
                    success=False,
                    message=str(exc),
                    weight_version=self.engine.weight_version,
                    unknown_plan=True,
                )
            ]
        except Exception as exc:
            text = f"{type(msg).__name__}: {type(exc).__name__}: {exc}"
            if isinstance(msg, UpdateWeights):
                return [
                    UpdateDone(
                        request_id=msg.request_id,
                        success=False,
                        message=text,
                        weight_version=self.engine.weight_version,
                        transport=msg.transport,
                        weights_incomplete=self.weights_incomplete,
                    )
                ]
            return [Result(request_id=msg.request_id, success=False, message=text)]

    def poll(self) -> list[Message]:
        """Replies of transport work that finished, and the job advanced by one stage."""
        out: list[Message] = []
        for receiver in self._idle_receivers():
            out.extend(receiver.poll())
        if self.job is not None:
            out.extend(self._advance(self.job))
        return out

    def busy(self) -> bool:
        """True when the loop must call poll(): not while a worker is still receiving."""
        if any(r.busy() for r in self._idle_receivers()):
            return True
        job = self.job
        if job is None:
            return False
        if job.stage is Stage.RECEIVING:
            return job.done.is_set() or self._overdue(job)
        if job.stage is Stage.READY:  # nothing to do but wait for the pusher's word
            return job.commit_ordered or job.ready_expired()
        return True

    def _idle_receivers(self) -> list[Receiver]:
        """Receivers no worker is using: housekeeping (e.g. unmapping a closed pusher's
        buffer) must not run under a receive."""
        busy = {
            id(j.receiver)
            for j in (self.job, self.abandoned)
            if j is not None and j.thread is not None and j.thread.is_alive()
        }
        return [r for r in self.receivers.values() if id(r) not in busy]

    def receiving(self) -> bool:
        return self.job is not None and self.job.stage is Stage.RECEIVING

    def wait(self, timeout_s: float) -> None:
        """Block until the worker of the update in flight finished, at most `timeout_s`."""
        job = self.job
        if job is not None and job.stage is Stage.RECEIVING:
            job.done.wait(timeout_s)
        else:
            time.sleep(timeout_s)

    def incoming_version(self) -> int | None:
        """The version an update in progress brings (named in "weights incomplete")."""
        if self.pending_version is not None:
            return self.pending_version
        return self.job.version if self.job is not None else None

    def close(self) -> None:
        """The engine is going away: cancel a receive in flight, release every receiver."""
        if self.job is not None:
            self.job.cancel.set()
        for receiver in self.receivers.values():
            receiver.close()
        for store in (self.shadow, self.engine.live_weights()):
            if store is not None:
                store.close()

    def _receiver(self, kind: str | None) -> Receiver:
        assert kind is not None
        if kind not in self.receivers:
            self.receivers[kind] = registry.receiver_class(kind)()
        return self.receivers[kind]

    # ------------------------------------------------------------ accept

    def _accept(self, msg: UpdateWeights) -> Message:
        """Validate the whole update before a byte arrives; refuse with nothing changed."""
        if self.job is not None:
            raise RuntimeError(f"update to version {self.job.version} still in progress")
        if self.abandoned is not None and self.abandoned.thread.is_alive():
            raise RuntimeError(
                f"the cancelled update to version {self.abandoned.version} is "
                "still stopping; retry shortly"
            )
        if msg.commit == "atomic" and msg.load_mode != "shadow":
            raise ValueError(
                f"commit: 'atomic' needs load_mode 'shadow' (got {msg.load_mode!r}): only a "
                "shadow update can wait for the others without touching the live weights"
            )
        if msg.weight_version <= self.engine.weight_version:
            raise ValueError(
                f"weight_version {msg.weight_version} is not newer than the "
                f"loaded version {self.engine.weight_version}"
            )
        live = self.engine.live_weights()
        self._check_delta(msg)
        plan = self._plan_of(msg, live)
        receiver = self._receiver(msg.transport)
        nbytes = receiver.check(msg, plan, live)
        job = UpdateJob(msg=msg, receiver=receiver, plan=plan, nbytes=nbytes)
        target = live
        if msg.load_mode == "shadow":
            if self.shadow is None:
                self.shadow = self.engine.new_shadow()
            target = self.shadow
            job.start_worker(self.shadow, into_live=False, base=self._delta_base(msg, live))
        self.job = job  # last: a refusal above leaves no job behind
        return UpdateAccepted(
            request_id=msg.request_id,
            weight_version=msg.weight_version,
            bytes=nbytes,
            store=target.store_ref if _writes_store(msg, plan) else None,
        )

    def _plan_of(self, msg: UpdateWeights, live: EngineWeights) -> BucketPlan | None:
        """The update's plan: its own (bucket updates), the delta's (disk deltas), or none."""
        if isinstance(msg, BucketUpdate):
            return self.plans.resolve(msg, live)
        if msg.delta is not None:  # a disk delta names its plan in `delta`
            return self.plans.resolve(msg.delta, live)  # type: ignore[arg-type]
        return None

    def _check_delta(self, msg: UpdateWeights) -> None:
        """A delta applies only to exactly its base version, fully loaded."""
        base = msg.delta.base_version if msg.delta is not None else None
        if base is None:
            return
        if self.weights_incomplete or base != self.engine.weight_version:
            state = "incomplete weights" if self.weights_incomplete else "version"
            raise ValueError(
                f"delta.base_version {base}: this engine holds {state} "
                f"{self.engine.weight_version}; send a full update"
            )

    @staticmethod
    def _delta_base(msg: UpdateWeights, live: EngineWeights) -> EngineWeights | None:
        """Why the live store: the shadow holds the version before the live one, not the
        delta's base, so each bucket with changes is first copied from the live store into
        the shadow (one memcpy of that bucket on the engine, while generation goes on), then
        patched. Whole (RAW) buckets need no copy."""
        has_base = msg.delta is not None and msg.delta.base_version is not None
        return live if has_base else None

    # ------------------------------------------------------------ the update order

    def _advance(self, job: UpdateJob) -> list[Message]:
        """One step of the order drawn in the module docstring."""
        if job.stage is Stage.WAITING and self._block_generation(job):
            job.was_incomplete, self.weights_incomplete = self.weights_incomplete, True
            self.pending_version = job.version
            live = self.engine.live_weights()
            job.start_worker(live, into_live=True, sink=self.engine.stream_sink(live))
        elif job.stage is Stage.RECEIVING:
            if job.done.is_set():
                job.stage, job.error = (
                    (Stage.FAILED, job.worker_error) if job.worker_error else (Stage.RECEIVED, "")
                )
            elif self._overdue(job):
                self._abandon(job)
        if job.stage is Stage.RECEIVED:
            if job.atomic:
                if job.msg.pause_mode is not None or self._block_generation(job):
                    return self._ready(job)
            elif job.msg.load_mode == "in_place" or self._block_generation(job):
                return self._commit(job)
        if job.stage is Stage.READY:
            if job.commit_ordered and self._block_generation(job):
                return self._commit(job)
            if job.ready_expired():
                job.stage = Stage.FAILED
                job.error = (
                    f"no CommitUpdate or AbortUpdate within commit_timeout_s "
                    f"({job.msg.commit_timeout_s:g}s) of UpdateReady; discarded"
                )
        if job.stage is Stage.FAILED:
            return self._fail(job)
        return []

    def _overdue(self, job: UpdateJob) -> bool:
        limit = 2 * job.msg.timeout_s + job.msg.idle_timeout_s + WORKER_GRACE_S
        return job.stage is Stage.RECEIVING and job.waited_s() > limit

    def _abandon(self, job: UpdateJob, why: str = "") -> None:
        """The watchdog (or an AbortUpdate): cancel the worker and remember it, so no update
        starts while it may still be mid-copy or inside its receiver; a shadow store it could
        still write is dropped (the next shadow update allocates a fresh one)."""
        job.cancel.set()
        self.abandoned = job
        job.stage = Stage.FAILED
        job.error = why or f"receive did not finish in {job.msg.timeout_s:.1f}s; cancelled"
        if not job.into_live:
            self._drop_shadow()  # a late writer may still land bytes in it: never reuse it

    def _drop_shadow(self) -> None:
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None

    def _retire_target(self, job: UpdateJob) -> None:
        """A pusher that was allowed to write this update's store may still write it late
        (stopped, then resumed): never compute with that store again. A shadow is dropped
        (the next shadow update allocates a fresh one); a live store, refusing generation
        already, is swapped for a fresh one that the next whole update fills."""
        if not job.into_live:
            self._drop_shadow()
            return
        old = self.engine.live_weights()
        self.engine.apply_weights(self.engine.new_shadow())
        old.close()

    def _block_generation(self, job: UpdateJob) -> bool:
        """Stop generation per the request's pause mode, or wait (bounded) for idle."""
        engine, mode = self.engine, job.msg.pause_mode
        if mode is not None:
            if engine.paused_mode() is None:
                engine.pause(mode)
                job.paused = True
            job.block_started = job.block_started or time.perf_counter()
            return True
        self.admission_held = True
        job.hold_started = job.hold_started or time.perf_counter()
        if engine.is_idle():
            job.block_started = job.block_started or time.perf_counter()
            return True
        if time.perf_counter() - job.hold_started > job.msg.idle_timeout_s:
            waiting, running = engine.counts()
            job.error = (
                f"engine not idle after {job.msg.idle_timeout_s:.1f}s "
                f"(waiting={waiting}, running={running}); set pause_mode to preempt"
            )
            job.stage = Stage.FAILED
        return False

    def _commit(self, job: UpdateJob) -> list[Message]:
        msg, start = job.msg, time.perf_counter()
        try:
            self._apply(job)
            if msg.flush_cache:
                self.engine.flush_kv(msg.torch_empty_cache)
        except Exception as exc:  # the model may hold part of the update: refuse until repaired
            self.weights_incomplete = job.apply_failed = True
            job.stage = Stage.FAILED
            job.error = f"loading into the model: {type(exc).__name__}: {exc}"
            return self._fail(job)
        self.engine.weight_version = msg.weight_version
        job.committed_at = time.time()  # wall clock: compared across engines (commit skew)
        self.weights_incomplete = False
        job.flush_s = time.perf_counter() - start
        job.stage = Stage.COMMITTED
        return self._finish(job, True, f"loaded version {msg.weight_version}")

    def _ready(self, job: UpdateJob) -> list[Message]:
        """Atomic: every byte is in the shadow; tell the pusher and hold until its word."""
        job.stage, job.ready_at = Stage.READY, time.perf_counter()
        return [
            UpdateReady(request_id=job.msg.request_id, weight_version=job.version, bytes=job.nbytes)
        ]

    # ------------------------------------------------------------ the pusher's word (atomic)

    def _on_commit(self, msg: CommitUpdate) -> list[Message]:
        """Switch now (between two steps): the reply, then the update's UpdateDone."""
        job = self._job_of(msg.weight_version)
        if job.stage is not Stage.READY:
            raise ValueError(
                f"weight_version {msg.weight_version}: the update is {job.stage.value}, "
                "not ready to commit"
            )
        job.commit_ordered = True
        ok = Result(request_id=msg.request_id, message=f"committing version {job.version}")
        return [ok, *self._advance(job)]

    def _on_abort(self, msg: AbortUpdate) -> list[Message]:
        """Discard the update in whatever stage it is; the old version keeps serving."""
        job = self._job_of(msg.weight_version)
        if job.stage is Stage.RECEIVING and not job.done.is_set():
            self._abandon(job, "aborted by the pusher while receiving; cancelled")
        else:
            job.stage, job.error = Stage.FAILED, "aborted by the pusher"
        ok = Result(request_id=msg.request_id, message=f"discarding version {job.version}")
        return [ok, *self._fail(job)]

    def _job_of(self, version: int) -> UpdateJob:
        if self.job is None or self.job.version != version:
            now = "none" if self.job is None else f"version {self.job.version}"
            raise ValueError(
                f"weight_version {version}: no such update in flight (in flight: {now})"
            )
        return self.job

    def _apply(self, job: UpdateJob) -> None:
        """Make the model compute with the received bytes; a shadow's old live store becomes
        the next shadow."""
        if job.msg.load_mode == "shadow":
            assert self.shadow is not None
            old = self.engine.live_weights()
            self.engine.apply_weights(self.shadow)
            self.shadow = old
        else:
            self.engine.apply_weights(self.engine.live_weights())

    def _fail(self, job: UpdateJob) -> list[Message]:
        if job.into_live and not job.live_touched and not job.apply_failed:
            self.weights_incomplete = job.was_incomplete  # this job wrote nothing
        if job.writer is not None and job.writer.exposed:
            self._retire_target(job)
        job.receiver.failed(job.msg)
        return self._finish(job, False, f"update to version {job.version} failed: {job.error}")

    def _finish(self, job: UpdateJob, ok: bool, text: str) -> list[Message]:
        done = UpdateDone(
            request_id=job.msg.request_id,
            success=ok,
            message=text,
            weight_version=self.engine.weight_version,
            bytes=job.nbytes,
            transport=job.msg.transport,
            timings=job.timings(),
            live_touched=(job.live_touched or job.apply_failed) and not ok,
            weights_incomplete=self.weights_incomplete,
            committed_at=job.committed_at,
        )
        if job.paused:
            self.engine.continue_generation()
        self.admission_held = False
        self.pending_version = None if not self.weights_incomplete else self.pending_version
        self.job = None
        return [done]

    # ------------------------------------------------------------ weight state

    def _fingerprints(self, msg: GetWeightsFingerprint) -> Message:
        weights = self.engine.live_weights()
        prints = weights.fingerprints(msg.names) if msg.names != [] else {}
        return WeightFingerprints(
            request_id=msg.request_id,
            weight_version=self.engine.weight_version,
            fingerprints=prints,
            weights_incomplete=self.weights_incomplete,
            update_in_progress=self.job is not None,
        )

    def _specs(self, msg: GetWeightSpecs) -> Message:
        """What an update must carry and, when the store can be written in place (and every
        store this engine allocates has the same layout), where each tensor's bytes sit."""
        live = self.engine.live_weights()
        layout = live.layout() if live.store_ref is not None else {}
        specs = [
            WeightSpec(
                name=n,
                dtype=d,
                shape=list(s),
                offset=layout[n][0] if n in layout else None,
                strides=list(layout[n][1]) if n in layout else [],
            )
            for n, (d, s) in live.expected().items()
        ]
        return WeightSpecs(
            request_id=msg.request_id,
            specs=specs,
            weight_version=self.engine.weight_version,
            store_bytes=live.flat.numel() if layout else 0,
        )


def _writes_store(msg: UpdateWeights, plan: BucketPlan | None) -> bool:
    """Whether the sender writes the engine's store itself (a plan that follows the store;
    never for delta payloads, which the engine decodes and applies)."""
    return plan is not None and in_store(plan) and msg.delta is None
