"""A complete, checked push of the next version to one engine (the tests' repair step)."""

from __future__ import annotations

from pathlib import Path

from infer_side.process.client import EngineClient
from rlsync.config import SyncConfig
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync.pusher import WeightPusher


def push_next(
    engine: EngineClient,
    ckpt: Path,
    work_dir: Path,
    transport: str = "ipc",
    load_mode: str = "in_place",
) -> int:
    """Push trainer_weights(ckpt, v) as v = engine's version + 1, assert it landed bit-exact,
    return v."""
    version = engine.info().weight_version + 1
    tensors = trainer_weights(ckpt, version)
    pusher = WeightPusher(
        SyncConfig(transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=20),
        {"engine": engine.endpoint},
        work_dir,
    )
    try:
        assert pusher.push(tensors, version).failed == []
        assert pusher.mismatches(tensors) == {"engine": []}
    finally:
        pusher.close()
    return version
