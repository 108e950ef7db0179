"""Live fuzz of a running engine server: every hostile frame gets an error reply (or is
dropped by the socket), the process stays up, its weights and version do not move, it leaks
nothing, and a normal generate afterwards gives exactly the tokens it gave before.

CI sends ~1,000 frames; `-m slow` sends 12,000 and prints the counts (scripts/reliability.sh).
"""

from __future__ import annotations

import time

import pytest
import zmq

from rlsync.config import SyncConfig
from rlsync.wire.codec import MAX_FRAME_BYTES
from rlsync.wire.protocol import GetWeightSpecs, WeightSpecs
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from tests.reliability.figures import record
from tests.reliability.fuzz_driver import fuzz_engine
from tests.reliability.fuzz_frames import FrameFactory
from tests.reliability.fuzz_targets import make_targets
from tests.reliability.procs import Snapshot, peak_rss_kb, settled
from trainer_side.sync.pusher import WeightPusher


def _state(engine) -> tuple[dict, list[list[int]]]:
    return engine.fingerprints(), [o.output_ids for o in engine.generate(PROMPTS, greedy())]


def _settle(engine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.fingerprints(names=[]).update_in_progress:
        assert time.monotonic() < deadline, "a fuzzed update never finished"
        time.sleep(0.1)


def _warm_shadow(engine, ckpt, tmp_path) -> None:
    """One real shadow update first: the engine then holds its second store (an exposed
    store keeps one lock fd open), so what the fuzz leaves behind is compared with that."""
    cfg = SyncConfig(transport="ipc", load_mode="shadow", bucket_mb=0.05, timeout_s=20)
    pusher = WeightPusher(cfg, {"e": engine.endpoint}, tmp_path)
    try:
        version = engine.info().weight_version + 1
        assert pusher.push(trainer_weights(ckpt, version), version).failed == []
    finally:
        pusher.close()


def run_fuzz(engine, ckpt, tmp_path, dead_port: int, n: int, seed: int) -> dict:
    _warm_shadow(engine, ckpt, tmp_path)
    before, tokens = _state(engine)
    pid = engine.process.pid
    snap = Snapshot.steady(pid)
    reply = engine.rpc.call_ok(GetWeightSpecs())
    assert isinstance(reply, WeightSpecs) and reply.specs, reply
    specs = {s.name: (s.dtype, tuple(s.shape)) for s in reply.specs}
    targets = make_targets(tmp_path / "targets", specs)
    start = time.monotonic()
    try:
        counts = fuzz_engine(
            engine.endpoint, FrameFactory(seed, specs, targets, dead_port).cases(n), dead_port
        )
    finally:
        targets.close()
    elapsed = time.monotonic() - start
    assert engine.process.poll() is None, engine.stderr_tail()
    _settle(engine)
    assert _state(engine) == (before, tokens)  # weights, version, flags and tokens unchanged
    assert settled(pid, snap) == snap  # no fd or thread left behind
    assert counts.sent >= 0.95 * n and counts.final_replies >= counts.sent
    assert counts.undecodable_replies == 0
    summary = {**counts.summary(), "seconds": round(elapsed, 1)}
    record("live_fuzz", **summary)
    return summary


def test_live_fuzz_1000_frames(engines, ckpt, tmp_path, dead_port):
    summary = run_fuzz(engines["e0"], ckpt, tmp_path, dead_port, n=1000, seed=1)
    valid = summary["by_category"]["interleaved_valid"]
    assert summary["error_replies"] >= summary["frames_sent"] - valid  # every hostile one refused
    # plain requests in between are served (a few meet a fuzzed update's "weights incomplete")
    assert summary["ok_by_category"]["interleaved_valid"] >= 0.9 * valid


@pytest.mark.slow
def test_live_fuzz_12000_frames(engines, ckpt, tmp_path, dead_port):
    run_fuzz(engines["e1"], ckpt, tmp_path, dead_port, n=12_000, seed=2)


def test_oversized_frame_is_dropped_before_it_is_buffered(engines):
    """A frame over the codec's cap is cut off by the socket (MAXMSGSIZE) as its header
    arrives: the engine never holds it in memory, and goes on answering."""
    engine = engines["e0"]
    peak = peak_rss_kb(engine.process.pid)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine.endpoint)
    try:
        sock.send(b"\x00" * (4 * MAX_FRAME_BYTES), copy=False)
        assert not sock.poll(1500), "an oversized frame got a reply: it was buffered whole"
    finally:
        sock.close(linger=0)
    assert engine.info().weight_version >= 0  # still answering
    grown_mb = (peak_rss_kb(engine.process.pid) - peak) / 1024
    record("oversized_frame", frame_mb=4 * MAX_FRAME_BYTES >> 20, peak_rss_growth_mb=grown_mb)
    assert grown_mb < MAX_FRAME_BYTES / 2**20, f"peak RSS grew {grown_mb:.0f} MB"
