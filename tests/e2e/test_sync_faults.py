"""Weight sync under faults, with real processes: a pusher SIGKILLed mid-push, an engine
SIGKILLed before a push. The engine must keep answering, never serve a mix of versions
(in_place: refuses to generate; shadow: old weights byte for byte), and the next complete
push must work; surviving engines must still get the version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 4.0

# A pusher in its own process whose packing stalls after the first bucket, so the test can
# SIGKILL it mid-push. Faking a slow trainer is fine; the engine side is the real one.
SLOW_PUSHER = r"""
import sys, time
import rlsync.transports.broadcast as broadcast, rlsync.transports.ipc as shm
from rlsync.config import SyncConfig
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync.pusher import WeightPusher

endpoint, transport, load_mode, version, ckpt, TIMEOUT = *sys.argv[1:6], float(sys.argv[6])
real_pack, packed = shm.pack_bucket, []
def slow_pack(bucket, tensors, out):
    real_pack(bucket, tensors, out)
    packed.append(1)
    if len(packed) == 2:
        print("PACKED", flush=True)
        time.sleep(600)
broadcast.pack_bucket = shm.pack_bucket = slow_pack
cfg = SyncConfig(transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=TIMEOUT)
pusher = WeightPusher(cfg, {"engine": endpoint}, "/tmp")
pusher.push(trainer_weights(ckpt, int(version)), int(version))
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=2)


@pytest.fixture(scope="module")
def engine(ckpt):
    client = launch_engine(ckpt, kv_tokens=512, threads=1)
    yield client
    client.close()


def _kill_pusher_mid_push(engine, ckpt, transport, load_mode, version):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_PUSHER,
            engine.endpoint,
            transport,
            load_mode,
            str(version),
            str(ckpt),
            str(TIMEOUT_S),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == b"PACKED", proc.stderr.read().decode()[-2000:]
        time.sleep(0.3)  # let the engine load the first bucket
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_update_settled(engine, deadline_s):
    """Poll (the engine must answer every call promptly) until the update in flight ended."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        start = time.monotonic()
        info = engine.fingerprints(names=[])
        assert time.monotonic() - start < 2.0, "engine loop stalled"
        if info.update_in_progress is False:
            return info
        time.sleep(0.2)
    raise AssertionError(f"update still in flight after {deadline_s}s: {info}")


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_pusher_killed_mid_push(engine, ckpt, transport, load_mode, tmp_path):
    before = engine.fingerprints()
    tokens_before = [o.output_ids for o in engine.generate(PROMPTS, greedy())]
    version = before.weight_version + 1
    _kill_pusher_mid_push(engine, ckpt, transport, load_mode, version)
    info = _wait_update_settled(engine, TIMEOUT_S * 2 + 5)
    assert info.weight_version == before.weight_version
    if load_mode == "shadow":  # the old version keeps serving, byte for byte
        assert engine.fingerprints() == before
        assert [o.output_ids for o in engine.generate(PROMPTS, greedy())] == tokens_before
    else:  # part of the live weights was overwritten: refuse rather than serve a mix
        assert info.weights_incomplete is True
        out = engine.generate([[1, 2, 3]], greedy())[0]
        assert "weights incomplete" in out.error and out.output_ids == []
    # the next complete push repairs everything
    tensors = trainer_weights(ckpt, version + 1)
    pusher = WeightPusher(
        SyncConfig(
            transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=TIMEOUT_S * 3
        ),
        {"engine": engine.endpoint},
        tmp_path,
    )
    try:
        assert pusher.push(tensors, version + 1).failed == []
        assert pusher.mismatches(tensors) == {"engine": []}
    finally:
        pusher.close()
    assert engine.info().weights_incomplete is False
    assert engine.generate([[1, 2, 3]], greedy())[0].error == ""


@pytest.mark.parametrize("transport", ["broadcast", "ipc", "disk"])
def test_dead_engine_is_named_and_survivors_get_the_version(ckpt, transport, tmp_path):
    alive, doomed = (launch_engine(ckpt, kv_tokens=256, threads=1) for _ in range(2))
    try:
        cfg = SyncConfig(transport=transport, bucket_mb=0.02, timeout_s=TIMEOUT_S)
        pusher = WeightPusher(cfg, {"alive": alive.endpoint, "doomed": doomed.endpoint}, tmp_path)
        try:
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            tensors = trainer_weights(ckpt, 7)
            report = pusher.push(tensors, 1)
            assert report.failed == ["doomed"]
            assert "doomed" in report.summary()
            assert pusher.mismatches(tensors) == {"alive": []}
            assert alive.info().weight_version == 1
            again = pusher.push(trainer_weights(ckpt, 8), 2)  # later pushes skip the dead one
            assert again.succeeded == ["alive"]
        finally:
            pusher.close()
    finally:
        alive.close()
        doomed.close()
