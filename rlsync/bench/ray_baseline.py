"""The Ray object store baseline: the trainer `ray.put`s its state dict and each engine-side
Ray actor `ray.get`s it and copies it into an engine-layout `ModelWeights` store.

Ray runs privately for this method only: started with its files under the run's directory
(`rlsync.app.ray_session.start_local`: short symlinked temp dir, private auth token) and shut
down when the method ends; a Ray this process already runs is reused and left running.
Ray serializes the state dict with its own serializer (inside Ray; nothing of ours).
End to end runs from the start of `ray.put` until the last actor's load is done.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ray
import torch

from rlsync.app.ray_session import connect, disconnect
from rlsync.bench.baselines import NO_ENGINE, finish, record
from rlsync.bench.stats import Row
from rlsync.model_config import ModelConfig


@ray.remote(num_cpus=1)
class RayReceiver:
    """Engine side: hold a store; `load` gets the dict from the object store and copies it in."""

    def __init__(self, model: dict[str, Any]):
        from infer_side.engines.weights import ModelWeights

        torch.set_num_threads(1)
        self.store = ModelWeights.empty(ModelConfig(**model))
        self.views = self.store.hf_views()

    def load(self, refs: list[Any]) -> dict[str, float]:
        t0 = time.perf_counter()
        state = ray.get(refs[0])
        t1 = time.perf_counter()
        with torch.no_grad():
            for name, t in state.items():
                self.views[name].copy_(t)
        t2 = time.perf_counter()
        return {"t_done": time.monotonic(), "recv_s": t1 - t0, "load_s": t2 - t1}


def run_ray(
    row: Row,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    repeat: int,
    work_dir: Path,
    timeout_s: float,
    ray_dir: Path | None = None,
) -> Row:
    """`repeat` timed put/get/load rounds (after one warm-up) to `row.engines` actors.

    Pass the same `ray_dir` for every call in one process: Ray caches the auth token of the
    first local cluster this process started, so a later one with a fresh token file in
    another directory fails to start ("InvalidAuthToken")."""
    session = connect(None, ray_dir or work_dir / "ray", num_cpus=row.engines + 1)
    actors: list[Any] = []
    samples: list[dict[str, float]] = []
    try:
        model = dataclasses.asdict(cfg)
        actors = [RayReceiver.remote(model) for _ in range(row.engines)]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=timeout_s)
        for rep in range(repeat + 1):
            t0 = time.monotonic()
            ref = ray.put(tensors)
            t_put = time.monotonic()
            events = ray.get([a.load.remote([ref]) for a in actors], timeout=timeout_s)
            del ref
            if rep:
                record(row, t0, t_put, events, samples, {"put_s": t_put - t0})
    finally:
        for actor in actors:
            ray.kill(actor)
        disconnect(session)
    return finish(row, samples, NO_ENGINE)
