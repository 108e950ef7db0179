"""WeightPusher: trainer rank 0 pushes a new weight version to every engine.

Usage:
    pusher = WeightPusher(sync_cfg, {"engine0": endpoint0, "engine1": endpoint1}, work_dir)
    report = pusher.push(model, version=1)     # nn.Module, state dict, or (name, tensor) pairs
    assert not report.failed
    pusher.close()

Each push: plan buckets (cached while names/shapes/dtypes stay the same) -> the sender
prepares (disk: writes files) -> announce the update to every live engine (the whole plan only
to engines that do not hold its plan_id yet) -> collect UpdateAccepted -> the sender moves the
bytes -> collect UpdateDone. An engine that dies is reported by name and the others still get
the version; for broadcast the group is rebuilt without it and the push repeated once. With
`sync.commit: atomic` the engines report ready instead and `trainer_side.atomic_commit` makes
all of them switch, or none (no repeat: the version lands nowhere, the report says why). The
transport is looked up in `rlsync.transports.registry`; this module knows nothing of the
engine's internals, only the protocol and the sender lifecycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from rlsync.auth import load_client_keys
from rlsync.buckets import (
    PlanError,
    dtype_from_name,
    plan_buckets,
    plan_in_store,
    plan_total_bytes,
    tensor_fingerprint,
)
from rlsync.config import SyncConfig
from rlsync.protocol import (
    BucketPlan,
    EngineDied,
    GetWeightsFingerprint,
    Message,
    UpdateAccepted,
    UpdateDone,
    WeightFingerprints,
    failed,
    plan_id_of,
)
from rlsync.transports import registry
from rlsync.transports.base import Announce, Sender
from trainer_side.atomic_commit import AtomicOutcome, AtomicRound
from trainer_side.push_report import PushError, PushReport
from trainer_side.sync_engines import EngineSet

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
        """`auth_keys`: a `rlsync.auth` key directory, required for engines on tcp:// endpoints.
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

    def push(self, weights: WeightsLike, version: int) -> PushReport:
        """Push `weights` as `version` to every live engine; raises PushError only when the
        input is wrong (nothing is sent then) or no engine got the version."""
        start = time.perf_counter()
        tensors = named_tensors(weights)
        plan = self._plan_for(tensors)
        with torch.no_grad():
            if self._stale_group:
                self._rebuild()
            dead_before = set(self.engines.dead)
            report = self._push_once(plan, tensors, version)
            if report.transfer_error and self.sender.can_rebuild:
                self.engines.find_dead()
                if set(self.engines.dead) - dead_before and self.cfg.commit == "independent":
                    # without them, once more (atomic: the version landed nowhere; it stays so)
                    self._rebuild()
                    report = self._push_once(plan, tensors, version)
            # an engine whose update failed dropped the group: form a new one next time
            failed_now = set(report.failed) - dead_before
            self._stale_group = self.sender.can_rebuild and bool(failed_now)
        report.finish(plan_total_bytes(plan), time.perf_counter() - start)
        if not report.succeeded:
            raise PushError(f"version {version} reached no engine: {report.summary()}", report)
        return report

    def _rebuild(self) -> None:
        self._stale_group = True  # stays set if the rendezvous fails: retried next push
        self.sender.rebuild()
        self._stale_group = False

    def _push_once(
        self, plan: BucketPlan, tensors: dict[str, torch.Tensor], version: int
    ) -> PushReport:
        report = PushReport(version, self.cfg.transport, commit=self.cfg.commit)
        self.sender.prepare(plan, tensors, version)
        announced_at = time.monotonic()
        rids, replies = self._announce(self.engines.live(), version, report)
        accepted, refused = [], {}
        for name, reply in replies.items():
            if isinstance(reply, UpdateAccepted):
                accepted.append(name)
                self.sender.accepted(name, reply)
            else:
                refused[name] = failed(reply) or "refused"
                report.record(name, False, refused[name], _done(reply))
        if accepted:
            self._send(report, plan, tensors, accepted)
            done = self.engines.gather({n: rids[n] for n in accepted}, self._done_wait_s())
            if self.cfg.commit == "atomic":
                atomic = AtomicRound(
                    self.engines, version, announced_at, self.cfg.commit_wait_s, self.cfg.timeout_s
                )
                outcome = atomic.finish(rids, done, refused, report.transfer_error)
                self._record_atomic(report, outcome)
            else:
                self._record_done(report, done)
        elif self.cfg.commit == "atomic":
            report.aborted_because = refused
        if any(isinstance(r, EngineDied) for r in replies.values()):
            self.engines.find_dead()  # silent at the announce: dead only if a ping fails too
        for name in self.engines.dead:
            report.record(name, False, "engine is dead")
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

    def _record_atomic(self, report: PushReport, outcome: AtomicOutcome) -> None:
        """Committed: each engine's UpdateDone (one missing means it died after the commit
        went out: the others switched). Aborted: the culprits' reasons, then the others'."""
        report.aborted_because = outcome.culprits
        blame = "; ".join(f"{n}: {why}" for n, why in sorted(outcome.culprits.items()))
        for name, reply in outcome.replies.items():
            why = failed(reply)
            ok = outcome.committed and why is None
            if ok:
                self.known_plans[name] = self.plan_id
                message = "ok"
            elif outcome.committed:
                message = f"no switch confirmed after CommitUpdate (the others switched): {why}"
            elif name in outcome.culprits:
                message = outcome.culprits[name]
            else:
                message = f"aborted, nothing switched ({blame}): {why}"
            report.record(name, ok, message, _done(reply))

    def _announce(
        self, names: list[str], version: int, report: PushReport
    ) -> tuple[dict[str, str], dict[str, Message]]:
        """Send each engine its update and gather the first replies; an engine that no longer
        holds the plan (restarted, or evicted it) gets the whole plan once more."""
        rids = self.engines.send({n: self._update_for(n, version, report) for n in names})
        replies = self.engines.gather(rids, self.cfg.timeout_s)
        again = [n for n, r in replies.items() if isinstance(r, UpdateDone) and r.unknown_plan]
        if again:
            for name in again:
                self.known_plans.pop(name, None)
            retry = self.engines.send({n: self._update_for(n, version, report) for n in again})
            rids.update(retry)
            replies.update(self.engines.gather(retry, self.cfg.timeout_s))
        return rids, replies

    def _update_for(self, engine: str, version: int, report: PushReport) -> Message:
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
    ) -> None:
        start = time.perf_counter()
        try:
            self.sender.send(plan, tensors, accepted)
        except Exception as exc:  # the engines report their side; keep the sender's reason too
            report.transfer_error = f"{type(exc).__name__}: {exc}"
        report.transfer_s = time.perf_counter() - start

    def _plan_for(self, tensors: dict[str, torch.Tensor]) -> BucketPlan:
        """Plan in the engines' dtypes (cast while packing); refuse a mismatch before sending.
        The plan (and its check) is redone only when names, dtypes or shapes change."""
        key = tuple((n, t.dtype, t.shape) for n, t in tensors.items())
        if key != self._plan_key:
            self._check_against_engines(tensors)
            specs = [(n, self.specs[n][0], tuple(t.shape)) for n, t in tensors.items()]
            self.plan, self._plan_key = self._plan(specs), key
            self.plan_id = plan_id_of(self.plan)
        assert self.plan is not None
        return self.plan

    def _plan(self, specs: list[tuple[str, str, tuple[int, ...]]]) -> BucketPlan:
        """Buckets in the engines' store layout when they all publish the same one (each
        bucket lands in place, and over ipc each byte is copied once), else packed."""
        layout = self.engines.layout
        if self.cfg.one_copy and layout is not None:
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

    def fingerprints(self, timeout_s: float | None = None) -> dict[str, WeightFingerprints]:
        """engine name -> its WeightFingerprints (engines that fail to answer are left out)."""
        replies = self.engines.call_all(GetWeightsFingerprint, timeout_s or self.cfg.timeout_s)
        return {n: r for n, r in replies.items() if isinstance(r, WeightFingerprints)}

    def mismatches(self, weights: WeightsLike) -> dict[str, list[str]]:
        """engine name -> tensors whose fingerprint differs from the trainer's (empty = equal)."""
        tensors = named_tensors(weights)
        mine = {
            n: tensor_fingerprint(t.to(dtype_from_name(self.specs[n][0])))
            for n, t in tensors.items()
        }
        return {
            engine: [n for n, fp in mine.items() if reply.fingerprints.get(n) != fp]
            for engine, reply in self.fingerprints().items()
        }

    def close(self) -> None:
        self.sender.close()
        self.engines.close()


def _done(reply: Message) -> UpdateDone | None:
    return reply if isinstance(reply, UpdateDone) else None
