"""The pusher's delta mode: which pushes may be deltas, and the base they are encoded against.

A push is a delta only when the pusher's base (`rlsync.plan.delta_encode.DeltaEncoder`: the packed bytes
of the last version every engine acknowledged) is known to be exactly what every live engine
serves. Otherwise it is full, and the report says why:

    no base yet -> full (it sets the base)
    the last push did not reach every engine (the base may be ahead of some) -> full
    every `sync.delta_full_every` pushes -> full
    an engine reports another version, or incomplete weights -> full

A full push in delta mode still travels as payloads (every bucket RAW, packed into the base
as it is sent), so it leaves the base in place. Any failure drops the base: the next push is
full. A delta that found every bucket dense (more than `sync.delta_max_changed` changed; an
fp32 policy under Adam changes every element every step) turns deltas off for the next
`DENSE_PLAIN_PUSHES` pushes: they are plain pushes, through the transport's fastest path
(in the engines' store where it can), keeping no base; then a full push takes a base again
and a delta is tried. An engine that comes back after a missed push (`EngineSet.revive`) may
hold any version, whatever it reports, so its push is full too.

The kind is decided once per push (`begin`), as a `PushKind`, and handed to the sender: a
sender never guesses it from `sync.delta` (a plain push in delta mode is still plain). A
repeat of a push (`again`) is never a delta: the failed attempt dropped the base. Knows the
protocol and the encoder only.
"""

from __future__ import annotations

from rlsync.config import SyncConfig
from rlsync.plan.delta_encode import DeltaEncoder, EncodeStats
from rlsync.transports.base import Encode, PushKind, Tensors
from rlsync.wire.protocol import BucketPlan, DeltaInfo, GetWeightsFingerprint, WeightFingerprints
from trainer_side.sync.engine_set import EngineSet
from trainer_side.sync.push_report import PushReport

DENSE_PLAIN_PUSHES = 10
"""After a delta that found only dense buckets, this many plain pushes before the next try."""


class DeltaPlanner:
    """Owns the base of the current plan and decides, push by push, delta or full."""

    def __init__(self, cfg: SyncConfig):
        self.cfg = cfg
        self.encoder: DeltaEncoder | None = None
        self.plan_id = ""
        self.since_full = 0
        """Delta pushes since the last full one."""
        self.plain_left = 0
        """Plain pushes still to make before deltas are tried again (dense changes)."""
        self.dense_share = 0.0

    def plain_next(self) -> bool:
        """Whether the next push is a plain one (no payloads, no base; see module doc)."""
        return self.plain_left > 0

    def begin(
        self, plan: BucketPlan, plan_id: str, engines: EngineSet, revived: list[str] | None = None
    ) -> tuple[PushKind, str]:
        """The kind of the next push, and why it is not a delta ("" for a delta). `revived`:
        engines back after a missed push (they get no delta)."""
        if self.plain_left > 0:
            self.plain_left -= 1
            return PushKind.PLAIN, (
                f"plain: the last delta found {self.dense_share:.0%} changed; deltas again "
                f"after {self.plain_left} more"
            )
        if self.encoder is None or self.plan_id != plan_id:
            self.encoder = DeltaEncoder(
                plan, checksum_raw=self.cfg.verify, max_changed=self.cfg.delta_max_changed
            )
            self.plan_id = plan_id
        back = f"{', '.join(revived)} came back after a missed push" if revived else ""
        reason = back or self._why_full(engines)  # it may hold any version, whatever it says
        self.encoder.begin()
        return (PushKind.FULL_PAYLOADS, reason) if reason else (PushKind.DELTA, "")

    def again(self, kind: PushKind) -> PushKind:
        """The kind of a repeat of a push of `kind`: plain stays plain, payloads go whole."""
        if kind is PushKind.PLAIN:
            return kind
        assert self.encoder is not None
        self.encoder.begin()
        return PushKind.FULL_PAYLOADS

    def info(self, kind: PushKind) -> DeltaInfo | None:
        """What the update messages of a push of `kind` say about payloads (None: plain)."""
        if kind is PushKind.PLAIN:
            return None
        assert self.encoder is not None
        return DeltaInfo(base_version=self.encoder.version if kind is PushKind.DELTA else None)

    def _why_full(self, engines: EngineSet) -> str:
        assert self.encoder is not None
        base = self.encoder.version
        if base is None:
            return "no base yet (first push, new plan, or the last push did not reach every engine)"
        if self.since_full + 1 >= self.cfg.delta_full_every:
            return f"periodic full push (sync.delta_full_every = {self.cfg.delta_full_every})"
        replies = engines.call_all(lambda: GetWeightsFingerprint(names=[]), self.cfg.timeout_s)
        for name in engines.live():
            reply = replies.get(name)
            if not isinstance(reply, WeightFingerprints):
                return f"{name} did not report its version"
            if reply.weights_incomplete or reply.weight_version != base:
                state = "incomplete weights" if reply.weights_incomplete else "version"
                return f"{name} holds {state} {reply.weight_version}, the base is {base}"
        return ""

    def adopt(self, plan: BucketPlan, plan_id: str, tensors: Tensors, version: int) -> None:
        """Take `tensors` as the base, at `version` (the caller proved the engines hold them)."""
        self.encoder = DeltaEncoder(
            plan, checksum_raw=self.cfg.verify, max_changed=self.cfg.delta_max_changed
        )
        self.plan_id, self.since_full, self.plain_left = plan_id, 0, 0
        for g in range(len(plan.buckets)):
            self.encoder.encode(g, tensors, full=True)
        self.encoder.version = version

    def encoder_for(self, tensors: Tensors, kind: PushKind) -> Encode:
        """Bucket g -> its payload in a push of `kind` (FULL_PAYLOADS: every bucket RAW)."""
        assert self.encoder is not None
        encoder, full = self.encoder, kind is not PushKind.DELTA
        return lambda g: encoder.encode(g, tensors, full=full)

    @property
    def stats(self) -> EncodeStats:
        return self.encoder.stats if self.encoder is not None else EncodeStats()

    def finish(self, report: PushReport, version: int, kind: PushKind, engines: EngineSet) -> None:
        """After a payload push: keep the base as `version` only if every live engine
        acknowledged it; a delta that found every bucket dense starts the plain pushes. The
        report gets the encoder's figures."""
        assert self.encoder is not None
        full = kind is not PushKind.DELTA
        reached = all(
            report.engines.get(n) is not None and report.engines[n].ok for n in engines.live()
        )
        if reached and not report.transfer_error:
            self.encoder.version = version
            self.since_full = 0 if full else self.since_full + 1
        else:
            self.encoder.invalidate()
        stats = self.encoder.stats
        dense = stats.buckets > 0 and stats.raw_buckets == stats.buckets
        if not full and dense and stats.changed_fraction > self.cfg.delta_max_changed:
            self.plain_left, self.dense_share = DENSE_PLAIN_PUSHES, stats.changed_fraction
            self.encoder.invalidate()  # plain pushes keep no base
        report.wire_bytes, report.encode_s = stats.wire_bytes, stats.seconds
        report.changed_fraction = stats.changed_fraction
