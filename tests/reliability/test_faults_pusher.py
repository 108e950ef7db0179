"""Trainer-side faults, as real processes: a pusher SIGSTOPped mid-push for longer than the
timeout and then resumed; a trainer pushing the same or an older version; a shared-memory
buffer that cannot be allocated (absurd size, and a genuinely full /dev/shm in a private
mount namespace). After each: no leaked segment, fd or thread, and the engine serves.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlsync.config import SyncConfig
from rlsync.transports import TransportError
from rlsync.transports.shm import ShmSender
from rlsync.wire.protocol import WeightFingerprints
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from tests.reliability.conftest import next_version
from tests.reliability.figures import record
from tests.reliability.model import reference_outputs
from tests.reliability.procs import Snapshot, local_threads_settled, own_segments, settled
from tests.reliability.pushes import push_next
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0
STALL = [
    ("ipc", "in_place"),  # CI; the opt-in run does all four
    pytest.param("broadcast", "shadow", marks=pytest.mark.slow),
    pytest.param("ipc", "shadow", marks=pytest.mark.slow),
    pytest.param("broadcast", "in_place", marks=pytest.mark.slow),
]


def _start_stalling_pusher(engine, transport, load_mode, version, ckpt) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tests.reliability.pusher_proc",
        engine.endpoint,
        transport,
        load_mode,
        str(version),
        str(ckpt),
        str(TIMEOUT_S),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    assert line.strip() == "STOPPING", proc.stderr.read() if proc.poll() is not None else line
    while Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0] != "T":
        time.sleep(0.01)  # until the kernel has it stopped
    return proc


def _wait_settled(engine, deadline_s: float) -> WeightFingerprints:
    """Poll until no update is in flight; every call must be answered promptly."""
    deadline = time.monotonic() + deadline_s
    while True:
        start = time.monotonic()
        info = engine.fingerprints(names=[])
        assert time.monotonic() - start < 2.0, "engine loop stalled"
        if not info.update_in_progress or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def _check_never_mixed(engine, before, tokens) -> str:
    """Either the old version still serves byte for byte (shadow, or in_place before any
    bucket landed), or the engine refuses to generate (in_place, live weights partly
    overwritten). Returns which."""
    if not engine.fingerprints(names=[]).weights_incomplete:
        assert engine.fingerprints() == before
        assert [o.output_ids for o in engine.generate(PROMPTS, greedy())] == tokens
        return "old version serving"
    out = engine.generate([[1, 2, 3]], greedy())[0]
    assert "weights incomplete" in out.error and out.output_ids == []
    return "refusing: weights incomplete"


@pytest.mark.parametrize("transport, load_mode", STALL)
def test_pusher_stopped_past_its_timeout_then_resumed(
    engines, ckpt, cfg, tmp_path, transport, load_mode
):
    engine = engines["e0"]
    version = push_next(engine, ckpt, tmp_path / "warm", "ipc", "in_place") + 1  # buffers mapped
    tokens = [o.output_ids for o in engine.generate(PROMPTS, greedy())]
    before, snap = engine.fingerprints(), Snapshot.steady(engine.process.pid)
    proc = _start_stalling_pusher(engine, transport, load_mode, version, ckpt)
    try:
        stopped = time.monotonic()
        info = _wait_settled(engine, TIMEOUT_S + 5)
        failed_after = time.monotonic() - stopped
        assert not info.update_in_progress, f"update still running {failed_after:.1f}s later"
        assert info.weight_version == before.weight_version
        state = _check_never_mixed(engine, before, tokens)
        if load_mode == "shadow":
            assert state == "old version serving"
        time.sleep(max(0.0, TIMEOUT_S + 1 - (time.monotonic() - stopped)))
        proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        out, err = proc.communicate(timeout=4 * TIMEOUT_S + 30)
        resumed_s = time.monotonic() - resumed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out.split("RESULT ", 1)[1]) if "RESULT " in out else {"stderr": err[-2000:]}
    assert "error" in result or result.get("failed") == ["engine"], result
    assert resumed_s < 3 * TIMEOUT_S + 10
    assert own_segments(proc.pid) == set()
    if transport == "broadcast":
        push_next(engine, ckpt, tmp_path / "repair", transport, load_mode)
    tensors = trainer_weights(ckpt, push_next(engine, ckpt, tmp_path / "fresh", "ipc", load_mode))
    got = [o.output_ids for o in engine.generate(PROMPTS, greedy())]
    assert got == reference_outputs(cfg, tensors, PROMPTS, [greedy()] * len(PROMPTS))
    assert settled(engine.process.pid, snap) == snap
    record(
        "fault_pusher_sigstop",
        transport=transport,
        load_mode=load_mode,
        engine_failed_update_after_s=round(failed_after, 2),
        timeout_s=TIMEOUT_S,
        engine_state_while_stopped=state,
        resumed_pusher_exit_s=round(resumed_s, 2),
        pusher_outcome=str(result)[:200],
    )


def _mapped_segments(pid: int, creator: int) -> int:
    """Bytes of `creator`'s shm segments that process `pid` still maps."""
    total = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if f"/dev/shm/rlsync-{creator}-" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            total += end - start
    return total


def test_engine_lets_go_of_a_closed_pushers_buffer(engines, ckpt, tmp_path):
    engine = engines["e1"]
    push_next(engine, ckpt, tmp_path, "ipc", "in_place")
    deadline = time.monotonic() + 5
    while _mapped_segments(engine.process.pid, os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.2)
    held = _mapped_segments(engine.process.pid, os.getpid())
    record("retained_shm_after_pusher_close", bytes_still_mapped=held)
    assert held == 0


def test_same_or_older_version_is_refused_by_every_engine(engines, ckpt, tmp_path):
    threads = {t.name for t in threading.enumerate()}
    version = next_version(engines)
    pusher = WeightPusher(
        SyncConfig(transport="ipc", bucket_mb=0.02, timeout_s=10),
        {n: c.endpoint for n, c in engines.items()},
        tmp_path,
    )
    try:
        assert pusher.push(trainer_weights(ckpt, version), version).failed == []
        before = {n: c.fingerprints() for n, c in engines.items()}
        for stale in (version, version - 1):
            with pytest.raises(PushError, match="not newer") as exc:
                pusher.push(trainer_weights(ckpt, version + 100), stale)
            assert exc.value.report.failed == sorted(engines)
            for outcome in exc.value.report.engines.values():  # each engine's own refusal
                assert not outcome.ok and outcome.done is not None
                assert (outcome.done.success, outcome.done.weight_version) == (False, version)
                assert outcome.done.transport == "ipc" and not outcome.done.live_touched
            assert {n: c.fingerprints() for n, c in engines.items()} == before
    finally:
        pusher.close()
    assert own_segments(os.getpid()) == set()
    assert local_threads_settled(threads) == set()
    record(
        "fault_stale_versions",
        pushed=version,
        refused=[version, version - 1],
        engines=sorted(engines),
    )


def test_absurd_shm_buffer_fails_clearly_and_leaks_nothing():
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TransportError, match="/dev/shm") as exc:
        ShmSender(capacity_bytes=1 << 50, num_engines=1)
    assert own_segments(os.getpid()) == set()
    assert len(os.listdir("/proc/self/fd")) == fds
    record("fault_shm_absurd_size", error=str(exc.value)[:160])


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs user + mount namespaces (unshare -Urm)")
def test_full_dev_shm_fails_clearly_instead_of_sigbus():
    """A 4 MiB /dev/shm seen only by the child (private mount namespace): nothing else on
    the machine is affected."""
    script = (
        f"mount -t tmpfs -o size=4m tmpfs /dev/shm && exec {sys.executable} "
        f"-m tests.reliability.shm_full_proc"
    )
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fits"] == "ok"
    assert result["too_big"].startswith("TransportError") and "/dev/shm" in result["too_big"]
    assert result["left"] == []
    record("fault_shm_full", tmpfs_mb=4, **result)
