"""Engine-side faults, as real processes: an engine SIGKILLed in the middle of a push (after
it accepted and loaded part of the update) while another engine must still get the version,
for the IPC and broadcast transports; and a KV pool far too small for the load, where every
request must finish (or wait its turn), none be lost, and outputs stay exact.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rlsync.transports.broadcast as broadcast
import rlsync.transports.ipc as ipc
from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from rlsync.wire.protocol import InitWeightsGroup, Result, SamplingParams
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from tests.reliability.conftest import KV_TOKENS, next_version
from tests.reliability.figures import record
from tests.reliability.model import reference_outputs
from tests.reliability.procs import Snapshot, local_threads_settled, own_segments, settled
from tests.reliability.pushes import push_next
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def spares(ckpt):
    """An engine to kill per transport, started together."""
    kinds = ("ipc", "broadcast")
    with ThreadPoolExecutor(len(kinds)) as pool:
        futures = {
            k: pool.submit(launch_engine, ckpt, kv_tokens=KV_TOKENS, threads=1) for k in kinds
        }
        clients = {k: f.result() for k, f in futures.items()}
    yield clients
    for c in clients.values():
        c.close()


def _kill_on_third_bucket(monkeypatch, doomed) -> dict:
    """Patch bucket packing so that, with buckets 0-1 out, the doomed engine is confirmed
    mid-update and then SIGKILLed; returns what was seen at that moment."""
    real, seen = ipc.pack_bucket, {"packed": 0}

    def pack(bucket, tensors, out):  # noqa: ANN001 - pack_bucket's signature
        real(bucket, tensors, out)
        seen["packed"] += 1
        if seen["packed"] == 3 and "killed_at" not in seen:
            deadline = time.monotonic() + 10
            while not (state := doomed.fingerprints(names=[])).weights_incomplete:
                assert time.monotonic() < deadline, state
                time.sleep(0.02)
            time.sleep(0.2)  # let it load what is out
            seen["doomed_state"] = {
                k: getattr(state, k) for k in ("update_in_progress", "weights_incomplete")
            }
            os.kill(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(timeout=10)
            seen["killed_at"] = time.monotonic()

    monkeypatch.setattr(ipc, "pack_bucket", pack)
    monkeypatch.setattr(broadcast, "pack_bucket", pack)
    return seen


@pytest.mark.parametrize("transport", ["ipc", "broadcast"])
def test_engine_killed_mid_push_survivor_gets_the_version(
    engines, spares, ckpt, cfg, tmp_path, monkeypatch, transport
):
    survivor, doomed = engines["e0"], spares[transport]
    push_next(survivor, ckpt, tmp_path / "warm")  # survivor's IPC buffers mapped: steady fds
    snap, threads = Snapshot.steady(survivor.process.pid), {t.name for t in threading.enumerate()}
    version = next_version([survivor, doomed])
    tensors = trainer_weights(ckpt, version)
    seen = _kill_on_third_bucket(monkeypatch, doomed)
    pusher = WeightPusher(
        SyncConfig(transport=transport, bucket_mb=0.02, timeout_s=TIMEOUT_S),
        {"survivor": survivor.endpoint, "doomed": doomed.endpoint},
        tmp_path,
    )
    try:
        start = time.monotonic()
        report = pusher.push(tensors, version)
        push_s = time.monotonic() - start
        assert seen.get("doomed_state") == {"update_in_progress": True, "weights_incomplete": True}
        assert report.failed == ["doomed"] and report.succeeded == ["survivor"], report.summary()
        done = report.engines["survivor"].done
        assert done is not None and (done.success, done.weight_version) == (True, version)
        assert done.transport == transport and not done.weights_incomplete
        assert pusher.mismatches(tensors)["survivor"] == []
    finally:
        pusher.close()
    assert push_s < 4 * TIMEOUT_S + 10
    assert survivor.info().weight_version == version
    got = [o.output_ids for o in survivor.generate(PROMPTS, greedy())]
    assert got == reference_outputs(cfg, tensors, PROMPTS, [greedy()] * len(PROMPTS))
    assert own_segments(os.getpid()) == set()
    assert local_threads_settled(threads) == set()
    assert settled(survivor.process.pid, snap) == snap
    record(
        "fault_engine_killed_mid_push",
        transport=transport,
        push_s=round(push_s, 2),
        buckets_packed=seen["packed"],
        summary=report.summary()[:200],
    )


def test_full_kv_pool_every_request_finishes_exactly(engines, ckpt, cfg, tmp_path):
    """16 requests of 92 tokens each (3x the 512-token pool) at once: a few run, the others
    wait or are retracted and recomputed; all finish and match a roomy engine."""
    engine = engines["e1"]
    weights = trainer_weights(ckpt, push_next(engine, ckpt, tmp_path / "known"))
    prompts = [[(7 * i + 3 * j) % 96 for j in range(12)] for i in range(16)]
    sampling = [
        SamplingParams(max_new_tokens=80)
        if i % 2 == 0
        else SamplingParams(max_new_tokens=80, temperature=0.8, seed=i)
        for i in range(16)
    ]
    retracted_before = engine.info().retracted
    start = time.monotonic()
    outs = engine.generate(prompts, sampling, timeout_s=300)
    seconds = time.monotonic() - start
    assert [o.error for o in outs] == [""] * 16
    assert {o.finish_reason for o in outs} == {"length"}
    assert all(len(o.output_ids) == 80 for o in outs)
    assert [o.output_ids for o in outs] == reference_outputs(cfg, weights, prompts, sampling)
    info = engine.info()
    assert (info.waiting, info.running) == (0, 0)
    record(
        "fault_kv_pool_full",
        requests=16,
        tokens_each=92,
        kv_tokens=KV_TOKENS,
        retracted=info.retracted - retracted_before,
        lost=0,
        seconds=round(seconds, 1),
    )
    push_next(engine, ckpt, tmp_path / "after")  # the engine still takes updates afterwards


def test_engine_keeps_answering_while_a_rendezvous_waits_for_rank_0(engines, dead_port):
    engine = engines["e1"]
    rpc = engine.rpc
    sent = rpc.send(InitWeightsGroup(master_port=dead_port, timeout_s=3.0, group_name="stall"))
    time.sleep(0.2)  # the engine is now waiting for a rank 0 that never comes
    try:
        start = time.monotonic()
        engine.info()
        answered_s = time.monotonic() - start
    finally:
        reply = rpc.recv(30)  # the rendezvous' own (failed) Result
        assert isinstance(reply, Result), reply
        assert reply.request_id == sent.request_id and not reply.success
    record("rendezvous_blocks_loop", answered_after_s=round(answered_s, 2), timeout_s=3.0)
    assert answered_s < 2.0  # before the 3 s rendezvous gives up, so it did not wait for it
