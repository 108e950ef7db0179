"""The lifecycle every transport implements, once per side, and what each side hands it.

Sender (trainer rank 0), per push:

    sender = Sender(cfg, engines, work_dir, device)      # open: groups, buffers, directories
    sender.prepare(plan, tensors, version, kind)        # work before the announcement
    msg = sender.announce(engine, fields)               # the UpdateWeights* for one engine
    sender.send(plan, tensors, accepted)                # move the bytes to those engines
                                                        # (send_encoded: payload kinds)
    sender.rebuild(names)                               # re-form without dead engines
    sender.close()

Receiver (engine), kept across updates:

    nbytes = receiver.check(msg, plan, weights)         # validate before any byte moves
    receiver.receive(msg, plan, writer)                 # worker thread; writer checks cancel
    receiver.close()

A receiver may also answer transport-specific control messages (`handles`/`handle`, e.g.
the broadcast group's InitWeightsGroup) and report work that finishes later (`poll`).
Nothing here knows an engine's internals or a trainer: named views in, bytes across.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from rlsync.config import SyncConfig
from rlsync.plan.buckets import bucket_views
from rlsync.plan.delta import Payload
from rlsync.transports import TransportError
from rlsync.wire.protocol import Bucket, BucketPlan, Message, UpdateAccepted, UpdateWeights

Tensors = Mapping[str, torch.Tensor]
Encode = Callable[[int], Payload]
"""Bucket index -> its delta payload (the pusher's `rlsync.plan.delta_encode.DeltaEncoder`)."""


class PushKind(enum.Enum):
    """What one push moves. The pusher decides it once per push and hands it to the sender
    (`prepare`); a sender acts on it and never guesses it from `sync.delta`: in delta mode a
    push may still be plain (after a dense delta), and a sender that wrote payloads anyway
    (or no files at all) would announce bytes no engine can take."""

    PLAIN = "plain"
    """The plan's bytes (packed, or in the engines' store layout): `send`."""
    FULL_PAYLOADS = "full"
    """Delta mode, full: every bucket as a whole (RAW) `rlsync.plan.delta` payload, which also
    sets the pusher's base: `send_encoded`."""
    DELTA = "delta"
    """Delta mode: payloads against the base every engine holds: `send_encoded`."""

    @property
    def payloads(self) -> bool:
        """The bytes travel as `rlsync.plan.delta` payloads (their plan is `delta.wire_plan`)."""
        return self is not PushKind.PLAIN


class Cancelled(TransportError):
    """The engine gave up on this receive; nothing more may be written."""


class ControlPlane(Protocol):
    """The trainer's view of its engines, as a sender needs it (trainer_side.EngineSet)."""

    dead: set[str]

    @property
    def names(self) -> list[str]: ...
    def live(self) -> list[str]: ...
    def index(self, name: str) -> int: ...
    def send(self, msgs: Mapping[str, Message]) -> dict[str, str]: ...
    def gather(self, rids: Mapping[str, str], timeout_s: float) -> dict[str, Message]: ...


class WeightStore(Protocol):
    """What a receiver checks an update against (infer_side's weights, or a backend's)."""

    def expected(self) -> dict[str, tuple[str, tuple[int, ...]]]: ...
    def validate(self, items: Any, complete: bool = True) -> None: ...


@dataclass(kw_only=True)
class Announce:
    """What every update message carries, filled in by the pusher."""

    fields: dict[str, Any]
    """The UpdateWeights fields common to every transport (version, modes, timeouts)."""
    plan: BucketPlan | None
    """The plan, or None when the engine already holds it (then only `plan_id` travels)."""
    plan_id: str


class Sender:
    """Trainer half of a transport. Subclasses set `kind` and implement announce/send."""

    kind: ClassVar[str] = ""
    can_rebuild: ClassVar[bool] = False
    encodes_before_announce: ClassVar[bool] = False
    """`send_encoded` runs before the announcement (disk: the engines read the payloads
    when they accept), with no engines named."""
    solo_bytes: ClassVar[int | None] = None
    """In a plan that follows the engines' store, tensors at least this large get a bucket
    of their own (a sender that can move a trainer tensor as it is then skips the pack)."""

    def __init__(
        self, cfg: SyncConfig, engines: ControlPlane, work_dir: Path, device: torch.device
    ):
        self.cfg, self.engines, self.work_dir, self.device = cfg, engines, work_dir, device

    def prepare(self, plan: BucketPlan, tensors: Tensors, version: int, kind: PushKind) -> None:
        """Work before the announcement (the disk transport writes a plain push's files
        here). `kind` says what this push moves: plain bytes (`send` follows) or payloads
        (`send_encoded` follows)."""

    def announce(self, engine: str, update: Announce) -> UpdateWeights:
        raise NotImplementedError

    def accepted(self, engine: str, reply: UpdateAccepted) -> None:
        """`engine` accepted the update (before `send`): e.g. it named the store to write."""

    def send(self, plan: BucketPlan, tensors: Tensors, accepted: list[str]) -> None:
        raise NotImplementedError

    def send_encoded(self, plan: BucketPlan, encode: Encode, accepted: list[str]) -> None:
        """Move bucket payloads of `rlsync.plan.delta` instead of packed buckets: `encode(g)`
        returns bucket g's payload (called in bucket order, as late as the transport allows,
        so encoding overlaps the transfer)."""
        raise NotImplementedError(f"the {self.kind} transport cannot send delta payloads")

    def rebuild(self, names: list[str] | None = None) -> None:
        """Re-form around `names` (default: the live engines; only where `can_rebuild`)."""

    def close(self) -> None:
        """Release buffers, groups and files this sender holds."""


class Receiver:
    """Engine half of a transport; one per kind, kept across updates."""

    kind: ClassVar[str] = ""
    control_messages: ClassVar[tuple[type[Message], ...]] = ()
    """Transport-specific requests this receiver answers through `handle`."""

    def handle(self, msg: Message) -> list[Message]:
        """Answer one of `control_messages` (replies now, or later through `poll`)."""
        raise TypeError(f"{type(self).__name__} does not handle {type(msg).__name__}")

    def poll(self) -> list[Message]:
        """Replies to control work that finished since the last call (loop thread)."""
        return []

    def busy(self) -> bool:
        """Whether `poll` has something to report now."""
        return False

    def check(self, msg: Any, plan: BucketPlan | None, weights: WeightStore) -> int:
        """Validate `msg` against the engine's weights; return its byte count. Raises with the
        offending field or tensor named; changes nothing."""
        raise NotImplementedError

    def receive(self, msg: Any, plan: BucketPlan | None, writer: WeightWriter) -> None:
        """Move the whole update into `writer` (worker thread). Raises on any failure."""
        raise NotImplementedError

    def failed(self, msg: Any) -> None:
        """An update through this receiver failed (e.g. a broadcast group is now unusable)."""

    def close(self) -> None:
        """Release groups and mappings."""


class WriteSink(Protocol):
    """Told what a receive wrote, as it writes (called on the receive's worker thread)."""

    def written(self, name: str) -> None: ...
    def bucket_done(self) -> None: ...


class WeightWriter:
    """The only way a receive touches weights: named views of one store, a cancel flag
    checked before every write, and the timings and "touched" flag the engine reports.

    Why one chokepoint: once the engine gives up on a receive (its watchdog fired), the
    worker thread may still be running; with every write going through `write`, it can
    finish at most the copy in flight and then stops with `Cancelled`.
    """

    def __init__(
        self,
        views: Mapping[str, torch.Tensor],
        cancel: threading.Event,
        sink: WriteSink | None = None,
        flat: torch.Tensor | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
    ):
        """`sink`: told of every tensor written and every bucket finished (a backend that
        copies the store into its model loads as bytes arrive). `flat`: the store's one flat
        buffer, when it has one (buckets of a plan that follows the store land there).
        `base`: views of the store a delta update applies to when it is not `views` itself
        (the live store, when a shadow store is written; `rlsync.plan.delta`)."""
        self.views, self.cancel, self.sink, self.flat = views, cancel, sink, flat
        self.base = base
        self.touched = False
        self.exposed = False
        """Another process was told it may write the store (`open_store`)."""
        self.load_s = 0.0

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("receive cancelled: the engine gave up on this update")

    def write(self, name: str, src: torch.Tensor) -> None:
        self.check_cancel()
        start = time.perf_counter()
        self.touched = True
        self.views[name].copy_(src)
        if self.sink is not None:
            self.sink.written(name)
        self.load_s += time.perf_counter() - start

    def current(self, name: str) -> torch.Tensor:
        """The bytes a delta to tensor `name` applies to: the base store's, if any."""
        return (self.base if self.base is not None else self.views)[name]

    def bring_to_base(self, names: list[str]) -> None:
        """Before a delta patches these tensors: copy them from the base store, when the
        target is another store (a shadow holds an older version than the live one)."""
        if self.base is not None:
            for name in names:
                self.write(name, self.base[name])

    def patch(self, name: str, width: int, index: torch.Tensor, values: torch.Tensor) -> None:
        """Set the `width`-byte units at flat positions `index` of tensor `name` to `values`
        (a delta's changed units; `rlsync.plan.delta`)."""
        self.check_cancel()
        start = time.perf_counter()
        self.touched = True
        view = self.views[name]
        units = view if view.is_contiguous() else view.contiguous()
        flat = units.reshape(-1).view(torch.uint8).view(values.dtype)
        flat.scatter_(0, index.to(flat.device), values.to(flat.device))
        if units is not view:
            view.copy_(units)
        if self.sink is not None:
            self.sink.written(name)
        self.load_s += time.perf_counter() - start

    def region(self, bucket: Bucket) -> torch.Tensor | None:
        """The bytes of the store `bucket` lands on in place (None: it must be staged and
        copied). Once handed out, the store counts as touched: a transport or a pusher
        writes it directly from now on."""
        if self.flat is None or bucket.store_offset is None:
            return None
        self.check_cancel()
        self.touched = True
        return self.flat[bucket.store_offset : bucket.store_offset + bucket.nbytes]

    def open_store(self) -> None:
        """Another process writes the store directly from now on (counts as touched). Marked
        before the cancel check: an engine that gives up on this receive meanwhile must see
        the store as handed out (and retire it), whichever of the two comes first."""
        if self.flat is None:
            raise TransportError("this engine's weights cannot be written in place")
        self.touched = self.exposed = True
        self.check_cancel()

    def landed(self, bucket: Bucket) -> None:
        """`bucket` arrived in place: tell the sink as if its tensors had been written."""
        self.check_cancel()
        if self.sink is not None:
            start = time.perf_counter()
            for spec in bucket.tensors:
                self.sink.written(spec.name)
            self.sink.bucket_done()
            self.load_s += time.perf_counter() - start

    def on_bucket(self, index: int, bucket: Bucket, buf: torch.Tensor) -> None:
        """The OnBucket callback of the bucket transports."""
        for name, view in bucket_views(bucket, buf):
            self.write(name, view)
        if self.sink is not None:
            self.check_cancel()
            start = time.perf_counter()
            self.sink.bucket_done()
            self.load_s += time.perf_counter() - start
