"""One weight update in flight (`UpdateJob`: its request, stage, worker thread and writer)
and the plans an engine has validated (`PlanCache`). The order they move in is
`infer_side.update.update_machine`'s; this module holds only their state, so the machine reads as
the state machine it is.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from infer_side.update.engine_api import EngineWeights
from rlsync.plan.buckets import (
    in_store,
    padded_bytes,
    tensor_nbytes,
    validate_placement,
    validate_plan,
)
from rlsync.transports.base import Receiver, WeightWriter, WriteSink
from rlsync.wire.protocol import (
    BucketPlan,
    BucketUpdate,
    UpdateTimings,
    UpdateWeights,
    plan_id_of,
)

PLANS_KEPT = 8


class Stage(Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"
    RECEIVED = "received"
    READY = "ready"
    """Atomic only: received and reported; switches on CommitUpdate."""
    COMMITTED = "committed"
    FAILED = "failed"


class UnknownPlan(ValueError):
    """An update named a plan_id this engine does not hold."""


@dataclass(eq=False)
class UpdateJob:
    """One update in flight: its request, stage and the worker receiving it."""

    msg: UpdateWeights
    receiver: Receiver
    plan: BucketPlan | None
    nbytes: int
    started: float = field(default_factory=time.perf_counter)
    stage: Stage = Stage.WAITING
    error: str = ""
    paused: bool = False
    """This job paused generation, so only it resumes it."""
    hold_started: float | None = None
    """When this job first asked to wait for idle (idle_timeout_s counts from here)."""
    block_started: float | None = None
    """When generation stopped for this job (pause, hold or weights incomplete)."""
    into_live: bool = False
    was_incomplete: bool = False
    """The live store was already incomplete (an earlier failed update) when this one began."""
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    writer: WeightWriter | None = None
    thread: threading.Thread | None = None
    worker_error: str = ""
    apply_failed: bool = False
    """Loading the received store into the model raised (the model may hold part of it)."""
    recv_s: float = 0.0
    flush_s: float = 0.0
    ready_at: float | None = None
    """When UpdateReady went out (atomic): commit_timeout_s counts from here."""
    commit_ordered: bool = False
    """CommitUpdate arrived: switch as soon as generation is blocked."""
    committed_at: float = 0.0
    """Wall-clock time of the switch (reported for the push's commit skew)."""

    @property
    def version(self) -> int:
        return self.msg.weight_version

    @property
    def atomic(self) -> bool:
        return self.msg.commit == "atomic"

    def ready_expired(self) -> bool:
        """Held READY past commit_timeout_s without a CommitUpdate: discard on our own."""
        return (
            self.stage is Stage.READY
            and not self.commit_ordered
            and self.ready_at is not None
            and time.perf_counter() - self.ready_at > self.msg.commit_timeout_s
        )

    def waited_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def live_touched(self) -> bool:
        """Whether the live store may hold bytes of this update (a worker still running after
        a cancel counts: it may be mid-copy)."""
        if not self.into_live or self.writer is None:
            return False
        return self.writer.touched or (self.thread is not None and self.thread.is_alive())

    def start_worker(
        self,
        target: EngineWeights,
        into_live: bool,
        sink: WriteSink | None = None,
        base: EngineWeights | None = None,
    ) -> None:
        """`base`: the store a delta update applies to, when it is not `target` (a shadow
        store holds the version before the live one; see `_delta_base`)."""
        self.stage, self.into_live = Stage.RECEIVING, into_live
        base_views = base.hf_views() if base is not None else None
        self.writer = WeightWriter(
            target.hf_views(), self.cancel, sink, flat=target.flat, base=base_views
        )
        self.thread = threading.Thread(
            target=self._run, name=f"weights-v{self.version}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        import torch  # inference_mode per thread: the copies need no autograd

        start = time.perf_counter()
        try:
            with torch.inference_mode():
                self.receiver.receive(self.msg, self.plan, self.writer)
        except Exception as exc:  # reported to the pusher, never kills the engine loop
            self.worker_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.recv_s = time.perf_counter() - start
            self.done.set()

    def timings(self) -> UpdateTimings:
        load_s = self.writer.load_s if self.writer is not None else 0.0
        pause_ms = (
            0.0 if self.block_started is None else (time.perf_counter() - self.block_started) * 1e3
        )
        return UpdateTimings(
            total_s=self.waited_s(),
            recv_s=max(self.recv_s - load_s, 0.0),
            load_s=load_s,
            flush_s=self.flush_s,
            pause_ms=pause_ms,
        )


class PlanCache:
    """Validated plans by plan_id, so an unchanged plan crosses the wire (and is checked)
    once; the few most recent are kept."""

    def __init__(self, keep: int = PLANS_KEPT):
        self.keep = keep
        self.plans: OrderedDict[str, BucketPlan] = OrderedDict()

    def resolve(self, msg: BucketUpdate, weights: EngineWeights) -> BucketPlan:
        if msg.plan is None:
            plan = self.plans.get(msg.plan_id)
            if plan is None:
                raise UnknownPlan(f"plan_id {msg.plan_id!r}: unknown to this engine; send the plan")
            self.plans.move_to_end(msg.plan_id)
            return plan
        plan_id = plan_id_of(msg.plan)
        if msg.plan_id and msg.plan_id != plan_id:
            raise ValueError(
                f"plan_id {msg.plan_id!r} does not match the plan's content ({plan_id})"
            )
        validate_plan(msg.plan, max_bytes=store_limit(weights, msg.plan.alignment))
        weights.validate([(s.name, s.dtype, s.shape) for b in msg.plan.buckets for s in b.tensors])
        if in_store(msg.plan) and weights.flat is not None:
            validate_placement(msg.plan, weights.placement(), weights.flat.numel())
        self.plans[plan_id] = msg.plan
        while len(self.plans) > self.keep:
            self.plans.popitem(last=False)
        return msg.plan


def store_limit(weights: EngineWeights, alignment: int) -> int:
    """The most bytes a plan for this engine may hold: every tensor it expects, plus
    alignment padding. A plan past it is refused before a staging buffer is allocated."""
    return padded_bytes((tensor_nbytes(d, s) for d, s in weights.expected().values()), alignment)
