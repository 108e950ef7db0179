"""WeightPusher: trainer rank 0 pushes a new weight version to every engine.

Usage:
    pusher = WeightPusher(sync_cfg, {"engine0": endpoint0, "engine1": endpoint1}, work_dir)
    report = pusher.push(model, version=1)     # nn.Module, state dict, or (name, tensor) pairs
    assert not report.failed
    pusher.close()

Each push: plan buckets (cached while names/shapes/dtypes stay the same) -> announce the
update to every engine and collect "accepted" -> move the bytes (broadcast group, IPC buffer
or safetensors directory) -> collect "done". An engine that dies is reported by name and the
others still get the version; for broadcast the group is rebuilt without it and the push
repeated once. It knows nothing of the engine's internals: only the protocol and transports.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from rlsync.auth import load_client_keys
from rlsync.buckets import dtype_from_name, plan_buckets, plan_total_bytes, tensor_fingerprint
from rlsync.config import SyncConfig
from rlsync.protocol import BucketPlan, GetWeightsFingerprint
from trainer_side.push_report import PushError, PushReport
from trainer_side.sync_engines import EngineSet
from trainer_side.sync_transports import make_transport

WeightsLike = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def named_tensors(weights: WeightsLike) -> dict[str, torch.Tensor]:
    """name -> detached tensor; a module's tied parameters appear once, as named_parameters does."""
    if isinstance(weights, torch.nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = weights.named_parameters()
    elif isinstance(weights, Mapping):
        items = weights.items()
    else:
        items = weights
    return {name: t.detach() for name, t in items}


class WeightPusher:
    """Pushes versions of one model to a fixed set of engines through one transport."""

    def __init__(self, cfg: SyncConfig, endpoints: Mapping[str, str], work_dir: str | Path,
                 *, device: str | torch.device = "cpu", connect_timeout_s: float = 60.0,
                 auth_keys: str | Path | None = None):
        """`auth_keys`: a `rlsync.auth` key directory, required for engines on tcp:// endpoints."""
        self.cfg = cfg
        auth = load_client_keys(auth_keys) if auth_keys is not None else None
        self.engines = EngineSet(endpoints, cfg.timeout_s, auth)
        try:
            self.specs = self.engines.discover(connect_timeout_s)
        except ValueError as exc:
            self.engines.close()
            raise PushError(str(exc)) from None
        self.transport = make_transport(cfg, self.engines, Path(work_dir), torch.device(device))
        self._plan_key: tuple | None = None
        self.plan: BucketPlan | None = None

    def push(self, weights: WeightsLike, version: int) -> PushReport:
        """Push `weights` as `version` to every live engine; raises PushError only when the
        input is wrong (nothing is sent then) or no engine got the version."""
        tensors = named_tensors(weights)
        plan = self._plan_for(tensors)
        start = time.perf_counter()
        report = self.transport.push(plan, tensors, version)
        if report.transfer_error and self.transport.can_rebuild and self.engines.find_dead():
            self.transport.rebuild()  # the group without the dead engines, then once more
            report = self.transport.push(plan, tensors, version)
        report.finish(plan_total_bytes(plan), time.perf_counter() - start)
        if not report.succeeded:
            raise PushError(f"version {version} reached no engine: {report.summary()}", report)
        return report

    def _plan_for(self, tensors: dict[str, torch.Tensor]) -> BucketPlan:
        """Plan in the engines' dtypes (cast while packing); refuse a mismatch before sending."""
        self._check_against_engines(tensors)
        key = tuple((n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
        if key != self._plan_key:
            specs = [(n, self.specs[n][0], tuple(t.shape)) for n, t in tensors.items()]
            self.plan, self._plan_key = plan_buckets(specs, self.cfg.bucket_bytes), key
        assert self.plan is not None
        return self.plan

    def _check_against_engines(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name not in self.specs:
                raise PushError(f"{name}: the engines have no tensor of that name")
            if tuple(t.shape) != self.specs[name][1]:
                raise PushError(f"{name}: shape {list(t.shape)}, engines expect {list(self.specs[name][1])}")
        missing = [n for n in self.specs if n not in tensors]
        if missing:
            raise PushError(f"{missing[0]}: missing from the pushed weights ({len(missing)} missing)")

    def fingerprints(self, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """engine name -> its GetWeightsFingerprint payload (weight_version, fingerprints)."""
        results = self.engines.call_all(lambda: GetWeightsFingerprint(), timeout_s or self.cfg.timeout_s)
        return {n: r.payload for n, r in results.items() if r.success}

    def mismatches(self, weights: WeightsLike) -> dict[str, list[str]]:
        """engine name -> tensors whose fingerprint differs from the trainer's (empty = equal)."""
        tensors = named_tensors(weights)
        mine = {n: tensor_fingerprint(t.to(dtype_from_name(self.specs[n][0]))) for n, t in tensors.items()}
        return {engine: [n for n, fp in mine.items() if payload["fingerprints"].get(n) != fp]
                for engine, payload in self.fingerprints().items()}

    def close(self) -> None:
        self.transport.close()
        self.engines.close()
