"""Ray plumbing for a run: connect (or start a private local Ray), place the actors, shut down.

A private local Ray keeps every file it writes inside the run directory: its temp/session
dir (reached through a short symlink, because Ray's unix sockets must fit in 107 bytes) and
its auth token (Ray 2.60 otherwise writes ~/.ray/auth_token). Only a Ray this module started
is shut down; joining a cluster (an address, or a Ray already initialised in this process,
as in tests) leaves it running.

Placement: `colocated` puts each trainer rank and its share of the engines in one bundle of
one STRICT_PACK placement group (one node; GPU shared by fractions); `disaggregated` gives
trainers and engines bundles of their own in two placement groups, so engines may land on
other nodes. `gather` waits for named actor calls, bounded, and names the actor that died,
raised or stalled. Nothing here knows about models, engines or PPO.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

AUTH_ENV = ("RAY_AUTH_TOKEN_PATH",)
"""Ray (>= 2.5x) turns token auth on for a new local cluster and reads the token from here."""


@dataclass
class RaySession:
    """What `connect` did, so `disconnect` undoes exactly that."""

    started: bool
    link_dir: Path | None = None
    saved_env: dict[str, str | None] = field(default_factory=dict)


def short_link(target: Path) -> Path:
    """A short path (/tmp/rls-XXXX/r) that is a symlink to `target` (unix-socket length limit)."""
    holder = Path(tempfile.mkdtemp(prefix="rls-", dir="/tmp"))
    link = holder / "r"
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link


def use_private_token(ray_dir: Path) -> dict[str, str | None]:
    """Token auth with a fresh token file under `ray_dir`; returns the env values it replaced."""
    token = ray_dir / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    saved = {k: os.environ.get(k) for k in AUTH_ENV}
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    return saved


def start_local(
    ray_dir: Path, num_cpus: float, num_gpus: int | None = None, log_to_driver: bool = True
) -> RaySession:
    """Start a private single-node Ray whose files all live in `ray_dir`."""
    ray_dir.mkdir(parents=True, exist_ok=True)
    saved = use_private_token(ray_dir)
    link = short_link(ray_dir)
    try:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            _temp_dir=str(link),
            include_dashboard=False,
            log_to_driver=log_to_driver,
            _node_ip_address="127.0.0.1",
            namespace="rlsync",
        )
    except BaseException:
        _restore_env(saved)
        shutil.rmtree(link.parent, ignore_errors=True)
        raise
    return RaySession(started=True, link_dir=link.parent, saved_env=saved)


def connect(
    address: str | None, ray_dir: Path, num_cpus: float, num_gpus: int | None = None
) -> RaySession:
    """Join `address`, reuse a Ray this process already runs, or start a private local one."""
    if ray.is_initialized():
        return RaySession(started=False)
    if address is not None:
        ray.init(address=address, namespace="rlsync")
        return RaySession(started=False)
    return start_local(ray_dir, num_cpus, num_gpus)


def disconnect(session: RaySession) -> None:
    """Shut down Ray only if `session` started it; remove the symlink; restore the env."""
    if session.started and ray.is_initialized():
        ray.shutdown()
    if session.link_dir is not None:
        shutil.rmtree(session.link_dir, ignore_errors=True)
    _restore_env(session.saved_env)


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------- placement


@dataclass
class Placement:
    """Placement groups of one run and which bundle each actor goes to."""

    groups: list[PlacementGroup]
    trainer_slots: list[tuple[int, int]]
    """rank -> (group index, bundle index)."""
    engine_slots: list[tuple[int, int]]
    gpu_per_actor: float

    def trainer_options(self, rank: int) -> dict[str, Any]:
        return self._options(*self.trainer_slots[rank])

    def engine_options(self, index: int) -> dict[str, Any]:
        return self._options(*self.engine_slots[index])

    def _options(self, group: int, bundle: int) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.groups[group], placement_group_bundle_index=bundle
        )
        return {"num_cpus": 1, "num_gpus": self.gpu_per_actor, "scheduling_strategy": strategy}

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)


def place(
    kind: str, world_size: int, num_engines: int, use_gpu: bool, timeout_s: float = 60.0
) -> Placement:
    """Reserve bundles for `world_size` trainers and `num_engines` engines; wait until ready."""
    if kind == "colocated":
        placement = _colocated(world_size, num_engines, use_gpu)
    elif kind == "disaggregated":
        placement = _disaggregated(world_size, num_engines, use_gpu)
    else:
        raise ValueError(f"placement={kind!r}: expected colocated or disaggregated")
    try:
        ray.get([g.ready() for g in placement.groups], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        placement.remove()
        need = "CPU and GPU" if use_gpu else "CPU"
        raise TimeoutError(
            f"placement {kind}: the cluster could not reserve {world_size} trainer "
            f"+ {num_engines} engine slots ({need}) within {timeout_s:.0f}s; "
            f"available: {ray.available_resources()}"
        ) from None
    return placement


def _colocated(world_size: int, num_engines: int, use_gpu: bool) -> Placement:
    """One bundle per trainer rank, holding that rank and the engines dealt to it."""
    per_bundle = [
        1 + sum(1 for e in range(num_engines) if e % world_size == r) for r in range(world_size)
    ]
    gpu_share = 1.0 / max(per_bundle) if use_gpu else 0.0
    bundles = [_bundle(n, 1 if use_gpu else 0) for n in per_bundle]
    group = placement_group(bundles, strategy="STRICT_PACK")
    return Placement(
        [group],
        [(0, r) for r in range(world_size)],
        [(0, e % world_size) for e in range(num_engines)],
        gpu_share,
    )


def _disaggregated(world_size: int, num_engines: int, use_gpu: bool) -> Placement:
    """Trainers packed together; engines spread, each in its own bundle."""
    gpus = 1 if use_gpu else 0
    trainers = placement_group([_bundle(1, gpus)] * world_size, strategy="PACK")
    engines = placement_group([_bundle(1, gpus)] * num_engines, strategy="SPREAD")
    return Placement(
        [trainers, engines],
        [(0, r) for r in range(world_size)],
        [(1, e) for e in range(num_engines)],
        float(gpus),
    )


def _bundle(cpus: int, gpus: int) -> dict[str, float]:
    return {"CPU": float(cpus), "GPU": float(gpus)} if gpus else {"CPU": float(cpus)}


# ---------------------------------------------------------------- bounded waits


class ActorCallError(RuntimeError):
    """An actor died, raised, or did not answer in time; the message names it and the call."""


def gather(calls: dict[str, Any], what: str, timeout_s: float) -> dict[str, Any]:
    """Wait for every named ObjectRef; raise ActorCallError on the first death, error or
    timeout (not after the slowest one), naming the actor and `what` it was doing."""
    pending = {ref: name for name, ref in calls.items()}
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
        if not ready:
            names = ", ".join(sorted(pending.values()))
            raise ActorCallError(f"{names}: no answer to {what} within {timeout_s:g} s")
        ref = ready[0]
        name = pending.pop(ref)
        results[name] = _get_one(ref, name, what)
    return {name: results[name] for name in calls}


def _get_one(ref: Any, name: str, what: str) -> Any:
    try:
        return ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as exc:
        raise ActorCallError(f"{name} died during {what}: {_death_reason(exc)}") from exc
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise ActorCallError(
            f"{name} failed during {what}: {type(cause).__name__}: {cause}"
        ) from exc


_EXC_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Dead|Timeout)): (.*)$")


def _death_reason(exc: BaseException) -> str:
    """Ray's death message is long (it carries the creation traceback): keep its first line and
    the exceptions it names (first and last), e.g. EngineStartError ... ImportError."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    found = [f"{m.group(1)}: {m.group(2)}" for ln in lines if (m := _EXC_LINE.match(ln))]
    picked = [lines[0].split(", \x1b")[0].split(", ray::")[0]]
    picked += list(dict.fromkeys(found[:1] + found[-1:]))
    return " | ".join(picked)
