"""WeightPusher: trainer rank 0 pushes a new weight version to every engine.

Usage:
    pusher = WeightPusher(sync_cfg, {"engine0": endpoint0, "engine1": endpoint1}, work_dir)
    report = pusher.push(model, version=1)     # nn.Module, state dict, or (name, tensor) pairs
    assert not report.failed
    pusher.close()

Each push: plan buckets (cached while names/shapes/dtypes stay the same) -> ping the engines
given up on earlier (`EngineSet.revive`; one that answers is back and gets this push in full,
named in `report.revived`) -> decide the `PushKind` once -> the sender prepares (disk: writes
files) -> announce to every live engine (the whole plan only to engines that do not hold its
plan_id) -> collect UpdateAccepted -> the sender moves the bytes -> collect UpdateDone. An
engine the push gives up on (silent, or no UpdateDone in time) is told AbortUpdate, so it
drops that update whenever it wakes; one silent at the announcement and at a ping is marked
dead until a later ping answers. The others still get the version; for broadcast the group
is rebuilt without the dead and the push repeated once. With `sync.commit: atomic` the
engines report ready and `trainer_side.sync.atomic_commit` makes all of them switch, or none. With
`sync.delta` the bytes move as `rlsync.plan.delta` payloads (`trainer_side.sync.delta_push` decides
delta, full or plain). The transport comes from `rlsync.transports.registry`; this module
knows only the protocol and the sender lifecycle, nothing of the engine's internals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from rlsync.config import SyncConfig
from rlsync.plan.buckets import (
    PlanError,
    dtype_from_name,
    plan_buckets,
    plan_in_store,
    plan_total_bytes,
    tensor_fingerprint,
)
from rlsync.transports import TransportError, registry
from rlsync.transports.base import Announce, Encode, PushKind, Sender
from rlsync.wire.auth import load_client_keys
from rlsync.wire.protocol import (
    AbortUpdate,
    BucketPlan,
    DeltaInfo,
    EngineDied,
    GetWeightsFingerprint,
    Message,
    UpdateAccepted,
    UpdateDone,
    WeightFingerprints,
    failed,
    plan_id_of,
)
from trainer_side.sync.atomic_commit import AtomicRound
from trainer_side.sync.delta_push import DeltaPlanner
from trainer_side.sync.engine_set import EngineSet
from trainer_side.sync.push_report import EngineOutcome, PushError, PushReport

GIVEN_UP = "not answering: given up on, and pinged again before every push"
"""The report's word for an engine the pusher gave up on (frozen, slow, or dead)."""
_MISSING = EngineOutcome(False, "")

WeightsLike = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def named_tensors(weights: WeightsLike) -> dict[str, torch.Tensor]:
    """name -> tensor; a module's tied parameters appear once, as named_parameters does.
    (Pushes run under no_grad, so nothing needs detaching.)"""
    if isinstance(weights, torch.nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = weights.named_parameters()
    elif isinstance(weights, Mapping):
        items = weights.items()
    else:
        items = weights
    return dict(items)


class WeightPusher:
    """Pushes versions of one model to a fixed set of engines through one transport."""

    def __init__(
        self,
        cfg: SyncConfig,
        endpoints: Mapping[str, str],
        work_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        connect_timeout_s: float = 60.0,
        auth_keys: str | Path | None = None,
        sender_class: Callable[..., Sender] | None = None,
    ):
        """`auth_keys`: a `rlsync.wire.auth` key directory, required for engines on tcp:// endpoints.
        `sender_class`: builds the sender instead of the registry's class for `cfg.transport`
        (same arguments; e.g. the sharded push's `ShardIpcSender`)."""
        self.cfg = cfg
        auth = load_client_keys(auth_keys) if auth_keys is not None else None
        self.engines = EngineSet(endpoints, cfg.timeout_s, auth)
        try:
            self.specs = self.engines.discover(connect_timeout_s)
            make = sender_class or registry.sender_class(cfg.transport)
            self.sender: Sender = make(cfg, self.engines, Path(work_dir), torch.device(device))
        except ValueError as exc:
            self.engines.close()
            raise PushError(str(exc)) from None
        except BaseException:
            self.engines.close()  # a failed rendezvous must not leak the RPC sockets
            raise
        self._plan_key: tuple | None = None
        self.plan: BucketPlan | None = None
        self.plan_id = ""
        self._stale_group = False
        self.known_plans: dict[str, str] = {}
        """engine name -> the plan_id it last accepted (it needs only the id next time)."""
        self.delta = DeltaPlanner(cfg) if cfg.delta else None

    def push(self, weights: WeightsLike, version: int) -> PushReport:
        """Push `weights` as `version` to every live engine; raises PushError only when the
        input is wrong (nothing is sent then) or no engine got the version."""
        start = time.perf_counter()
        tensors = named_tensors(weights)
        plain = self.delta is None or self.delta.plain_next()
        plan = self._plan_for(tensors, packed=not plain)
        with torch.no_grad():
            revived = self._revive()
            kind, why = self._kind(plan, revived)
            dead_before = set(self.engines.dead)
            report = self._push_once(plan, tensors, version, kind, why)
            report = self._retry_failed_delta(report, plan, tensors, version)
            if report.transfer_error and self.sender.can_rebuild:
                report = self._repeat_without_lost(
                    report, plan, tensors, version, (kind, why), dead_before
                )
            # an engine whose update failed dropped the group: form a new one next time
            failed_now = set(report.failed) - dead_before
            self._stale_group = self.sender.can_rebuild and bool(failed_now)
        report.revived = revived
        report.finish(plan_total_bytes(plan), time.perf_counter() - start)
        if not report.succeeded:
            raise PushError(f"version {version} reached no engine: {report.summary()}", report)
        return report

    def _revive(self) -> list[str]:
        """Ping the engines given up on; those that answer are back (their plan is sent again:
        they may have restarted). A broadcast group is re-formed now, with them, or without
        them when they fail its rendezvous (they stay dead: pinged again next push)."""
        revived = self.engines.revive()
        for name in revived:
            self.known_plans.pop(name, None)
        if revived and self.sender.can_rebuild:
            self._stale_group = True
        if self._stale_group:
            try:
                self._rebuild()
            except TransportError:
                if not revived:
                    raise
                self.engines.give_up(revived)
                revived = []
                self._rebuild()
        return revived

    def _kind(self, plan: BucketPlan, revived: list[str]) -> tuple[PushKind, str]:
        """This push's kind, decided once (delta mode: `DeltaPlanner.begin`), and why it is
        not a delta."""
        if self.delta is None:
            return PushKind.PLAIN, ""
        return self.delta.begin(plan, self.plan_id, self.engines, revived)

    def _repeat_without_lost(
        self,
        report: PushReport,
        plan: BucketPlan,
        tensors: dict[str, torch.Tensor],
        version: int,
        kind_why: tuple[PushKind, str],
        dead_before: set[str],
    ) -> PushReport:
        """A broadcast broke: find who stopped answering, and push once more, in a group of
        just the live engines that do not hold the version yet (an engine may have received
        every bucket before the group broke: it keeps its success, it is not asked again,
        which it would refuse as "not newer"). Atomic: the version landed nowhere; it stays so."""
        kind, why = kind_why
        self.engines.find_dead()
        lost = sorted(self.engines.dead - dead_before)
        need = [n for n in self.engines.live() if not report.engines.get(n, _MISSING).ok]
        if not lost or not need or self.cfg.commit != "independent":
            return report
        self._rebuild(need)
        self._stale_group = True  # the next push re-forms the group with every live engine
        again = self.delta.again(kind) if self.delta is not None else kind
        why = f"{why or 'a delta'}; repeated whole without {', '.join(lost)}"
        retry = self._push_once(plan, tensors, version, again, why, names=need)
        for name in report.succeeded:
            retry.engines[name] = report.engines[name]
        retry.transfer_s += report.transfer_s
        return retry

    def _rebuild(self, names: list[str] | None = None) -> None:
        self._stale_group = True  # stays set if the rendezvous fails: retried next push
        self.sender.rebuild(names)
        self._stale_group = False

    def _push_once(
        self,
        plan: BucketPlan,
        tensors: dict[str, torch.Tensor],
        version: int,
        kind: PushKind,
        why: str = "",
        names: list[str] | None = None,
    ) -> PushReport:
        """One announce + transfer of a push of `kind` to `names` (default: every live
        engine). `why`: why a push in delta mode is not a delta (for the report)."""
        report = self._new_report(version, plan, kind, why)
        delta = self.delta.info(kind) if self.delta is not None else None
        encode = self.delta.encoder_for(tensors, kind) if self.delta and kind.payloads else None
        self.sender.prepare(plan, tensors, version, kind)
        if encode is not None and self.sender.encodes_before_announce:
            self._send(report, plan, tensors, [], encode)  # disk: the payload files
        announced_at = time.monotonic()
        rids, replies = self._announce(names or self.engines.live(), version, report, delta)
        accepted, refused, silent = self._sort_answers(report, replies)
        if self.cfg.commit != "atomic":
            self._abort(version, silent)
        done: dict[str, Message] = {}
        if accepted:
            if encode is None or not self.sender.encodes_before_announce:
                self._send(report, plan, tensors, accepted, encode)
            done = self.engines.gather({n: rids[n] for n in accepted}, self._done_wait_s())
        if self.cfg.commit == "atomic":
            atomic = AtomicRound(
                self.engines, version, announced_at, self.cfg.commit_wait_s, self.cfg.timeout_s
            )
            outcome = atomic.finish(rids, done, refused, report.transfer_error, silent=silent)
            for name in outcome.record_into(report):
                self.known_plans[name] = self.plan_id
        else:
            self._record_done(report, done)
            self._abort(version, [n for n, r in done.items() if not isinstance(r, UpdateDone)])
        self._after(report, version, kind, silent)
        return report

    def _sort_answers(
        self, report: PushReport, replies: Mapping[str, Message]
    ) -> tuple[list[str], dict[str, str], list[str]]:
        """The announcement's answers: who accepted (the sender is told), who refused or was
        silent (recorded, with why), and who was silent."""
        accepted, refused = [], {}
        for name, reply in replies.items():
            if isinstance(reply, UpdateAccepted):
                accepted.append(name)
                self.sender.accepted(name, reply)
            else:
                refused[name] = failed(reply) or "refused"
                report.record(name, False, refused[name], _done(reply))
        return accepted, refused, [n for n, r in replies.items() if isinstance(r, EngineDied)]

    def _after(self, report: PushReport, version: int, kind: PushKind, silent: list[str]) -> None:
        """Engines silent at the announcement are given up on (left out, pinged without a
        wait: a later push finds them if they wake); every engine given up on is in the
        report. Delta mode: the base and the figures."""
        self.engines.give_up(silent)
        for name in self.engines.dead:
            report.record(name, False, GIVEN_UP)
        if self.delta is not None and kind.payloads:
            self.delta.finish(report, version, kind, self.engines)

    def _new_report(self, version: int, plan: BucketPlan, kind: PushKind, why: str) -> PushReport:
        report = PushReport(version, self.cfg.transport, commit=self.cfg.commit)
        if self.delta is not None:
            report.delta = f"full: {why}" if kind is not PushKind.DELTA else "delta"
        if self.delta is not None and kind is PushKind.PLAIN:  # all of the plan's bytes
            report.wire_bytes, report.changed_fraction = plan_total_bytes(plan), 1.0
        return report

    def _abort(self, version: int, names: list[str]) -> None:
        """Tell engines the pusher gave up on in this push (silent, or no UpdateDone in time)
        to drop the update: a frozen engine reads it right after the update when it wakes, so
        it never finishes a push the report calls failed, nor blocks the next one."""
        self.engines.tell({n: AbortUpdate(weight_version=version) for n in names})

    def _retry_failed_delta(
        self, report: PushReport, plan: BucketPlan, tensors: dict[str, torch.Tensor], version: int
    ) -> PushReport:
        """A delta that some engines refused or could not apply (their bytes were not the
        base) is pushed again in full to them, at once. A broadcast reaches every member
        or none, so there only when every member failed."""
        if report.delta != "delta":
            return report
        failed_now = [n for n in report.failed if n not in self.engines.dead]
        if not failed_now or (self.sender.can_rebuild and report.succeeded):
            return report
        if self.sender.can_rebuild:
            self._rebuild()  # the failed members left the group
        why = report.engines[failed_now[0]].message[-300:]
        assert self.delta is not None
        again = self.delta.again(PushKind.DELTA)
        retry = self._push_once(plan, tensors, version, again, "retry", names=failed_now)
        report.engines.update(retry.engines)
        report.delta = f"delta; full again to {', '.join(failed_now)} ({failed_now[0]}: {why})"
        report.wire_bytes += retry.wire_bytes
        report.transfer_s += retry.transfer_s
        return report

    def _done_wait_s(self) -> float:
        """How long engines may take to answer after the bytes: an atomic engine with
        pause_mode None also waits for idle before it reports ready."""
        idle = self.cfg.idle_timeout_s if self.cfg.pause_mode is None else 0.0
        return 2 * self.cfg.timeout_s + (idle if self.cfg.commit == "atomic" else 0.0)

    def _record_done(self, report: PushReport, done: Mapping[str, Message]) -> None:
        for name, reply in done.items():
            report.record(name, failed(reply) is None, failed(reply) or "ok", _done(reply))
            if failed(reply) is None:
                self.known_plans[name] = self.plan_id

    def _announce(
        self,
        names: list[str],
        version: int,
        report: PushReport,
        delta: DeltaInfo | None = None,
    ) -> tuple[dict[str, str], dict[str, Message]]:
        """Send each engine its update and gather the first replies; an engine that no longer
        holds the plan (restarted, or evicted it) gets the whole plan once more."""
        rids = self.engines.send({n: self._update_for(n, version, report, delta) for n in names})
        replies = self.engines.gather(rids, self.cfg.timeout_s)
        again = [n for n, r in replies.items() if isinstance(r, UpdateDone) and r.unknown_plan]
        if again:
            for name in again:
                self.known_plans.pop(name, None)
            retry = self.engines.send(
                {n: self._update_for(n, version, report, delta) for n in again}
            )
            rids.update(retry)
            replies.update(self.engines.gather(retry, self.cfg.timeout_s))
        return rids, replies

    def _update_for(
        self, engine: str, version: int, report: PushReport, delta: DeltaInfo | None = None
    ) -> Message:
        send_plan = self.known_plans.get(engine) != self.plan_id
        report.plan_sent |= send_plan
        c = self.cfg
        fields = dict(
            weight_version=version,
            flush_cache=c.flush_cache,
            torch_empty_cache=c.torch_empty_cache,
            load_mode=c.load_mode,
            pause_mode=c.pause_mode,
            idle_timeout_s=c.idle_timeout_s,
            timeout_s=c.timeout_s,
            verify=c.verify,
            delta=delta,
            commit=c.commit,
            commit_timeout_s=c.commit_wait_s,
        )
        return self.sender.announce(
            engine,
            Announce(fields=fields, plan=self.plan if send_plan else None, plan_id=self.plan_id),
        )

    def _send(
        self,
        report: PushReport,
        plan: BucketPlan,
        tensors: dict[str, torch.Tensor],
        accepted: list[str],
        encode: Encode | None = None,
    ) -> None:
        start = time.perf_counter()
        try:
            if encode is not None:
                self.sender.send_encoded(plan, encode, accepted)
            else:
                self.sender.send(plan, tensors, accepted)
        except Exception as exc:  # the engines report their side; keep the sender's reason too
            report.transfer_error = f"{type(exc).__name__}: {exc}"
        report.transfer_s = time.perf_counter() - start

    def _plan_for(self, tensors: dict[str, torch.Tensor], packed: bool = False) -> BucketPlan:
        """Plan in the engines' dtypes (cast while packing); refuse a mismatch before sending.
        The plan (and its check) is redone only when names, dtypes or shapes change, or
        `packed` does (delta payloads are decoded and applied through named views, so their
        plan is a packed one, never the engines' store layout)."""
        key = (packed, tuple((n, t.dtype, t.shape) for n, t in tensors.items()))
        if key != self._plan_key:
            self._check_against_engines(tensors)
            specs = [(n, self.specs[n][0], tuple(t.shape)) for n, t in tensors.items()]
            self.plan, self._plan_key = self._plan(specs, packed), key
            self.plan_id = plan_id_of(self.plan)
        assert self.plan is not None
        return self.plan

    def _plan(self, specs: list[tuple[str, str, tuple[int, ...]]], packed: bool) -> BucketPlan:
        """Buckets in the engines' store layout when they all publish the same one (each
        bucket lands in place, and over ipc each byte is copied once), else packed."""
        layout = self.engines.layout
        if self.cfg.one_copy and not packed and layout is not None:
            try:
                return plan_in_store(specs, layout, self.cfg.bucket_bytes, self.sender.solo_bytes)
            except PlanError:
                pass  # offsets a plan cannot follow: stage instead
        return plan_buckets(specs, self.cfg.bucket_bytes)

    def _check_against_engines(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name not in self.specs:
                raise PushError(f"{name}: the engines have no tensor of that name")
            if tuple(t.shape) != self.specs[name][1]:
                raise PushError(
                    f"{name}: shape {list(t.shape)}, engines expect {list(self.specs[name][1])}"
                )
        missing = [n for n in self.specs if n not in tensors]
        if missing:
            raise PushError(
                f"{missing[0]}: missing from the pushed weights ({len(missing)} missing)"
            )

    def adopt_base(self, weights: WeightsLike) -> int:
        """Delta mode: take `weights` as what every engine holds now, so the next push is a
        delta against them (e.g. `rlsync push --delta --base-checkpoint`). Checked first:
        every engine must serve one version, whole, with exactly these bytes (fingerprints);
        returns that version. Raises PushError, changing nothing, otherwise."""
        if self.delta is None:
            raise PushError("adopt_base needs sync.delta")
        tensors = named_tensors(weights)
        plan = self._plan_for(tensors, packed=True)
        replies = self.fingerprints()
        missing = sorted(set(self.engines.live()) - set(replies))
        if missing:
            raise PushError(f"{missing[0]}: did not report its fingerprints")
        versions = {r.weight_version for r in replies.values()}
        if len(versions) != 1 or any(r.weights_incomplete for r in replies.values()):
            raise PushError(f"the engines do not serve one whole version: {sorted(versions)}")
        bad = {e: m for e, m in self._mismatches(tensors, replies).items() if m}
        if bad:
            engine, names = next(iter(bad.items()))
            raise PushError(f"{engine}: holds other bytes than the base in {names[:3]}")
        version = versions.pop()
        self.delta.adopt(plan, self.plan_id, tensors, version)
        return version

    def fingerprints(self, timeout_s: float | None = None) -> dict[str, WeightFingerprints]:
        """engine name -> its WeightFingerprints (engines that fail to answer are left out)."""
        replies = self.engines.call_all(GetWeightsFingerprint, timeout_s or self.cfg.timeout_s)
        return {n: r for n, r in replies.items() if isinstance(r, WeightFingerprints)}

    def mismatches(self, weights: WeightsLike) -> dict[str, list[str]]:
        """engine name -> tensors whose fingerprint differs from the trainer's (empty = equal)."""
        return self._mismatches(named_tensors(weights), self.fingerprints())

    def _mismatches(
        self, tensors: dict[str, torch.Tensor], replies: Mapping[str, WeightFingerprints]
    ) -> dict[str, list[str]]:
        mine = {
            n: tensor_fingerprint(t.to(dtype_from_name(self.specs[n][0])))
            for n, t in tensors.items()
        }
        return {
            engine: [n for n, fp in mine.items() if reply.fingerprints.get(n) != fp]
            for engine, reply in replies.items()
        }

    def close(self) -> None:
        self.sender.close()
        self.engines.close()


def _done(reply: Message) -> UpdateDone | None:
    return reply if isinstance(reply, UpdateDone) else None
