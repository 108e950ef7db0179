"""A busy engine never holds up, nor half-updates itself from, a one-copy ipc push. Two real
engines, in_place updates that wait for idle (`pause_mode` None) with a small
`idle_timeout_s`; one engine keeps generating a long request, so its wait for idle runs out
after it accepted. That engine says so at once (`ipc.Receiver.failed` writes its declined
word), so the push to the other completes without waiting `timeout_s` for it (before: the
pusher waited the whole `timeout_s`, stalling every engine), and it keeps serving its old
bytes under its old version. From a sharded trainer (two FSDP ranks) the same holds: before,
rank 1 wrote its rows into the busy engine's live store anyway (rank 0 had left it behind),
and the engine went on generating on rank 0's old rows plus rank 1's new ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from infer_side.process.client import EngineClient, connect, launch_engine
from rlsync.config import SyncConfig
from rlsync.plan.buckets import tensor_fingerprint
from rlsync.wire.protocol import SamplingParams
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.shard_procs import host_store, run_ranks
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.pusher import WeightPusher

POSITIONS = 16384
"""Long enough that one request keeps the engine busy for many seconds (~1.5 ms a token)."""
TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(
        tmp_path_factory.mktemp("ckpt"), seed=6, max_position_embeddings=POSITIONS
    )


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = [launch_engine(ckpt, kv_tokens=POSITIONS, threads=1) for _ in range(2)]
    yield clients
    for client in clients:
        client.close()


@contextmanager
def generating(engine: EngineClient) -> Iterator[None]:
    """`engine` runs one request of almost `POSITIONS` tokens (its own connection, on a
    thread) from its first token until the block ends; then it is aborted."""
    client = connect(engine.endpoint)
    first, rid, done = threading.Event(), [], threading.Event()

    def run() -> None:
        sampling = SamplingParams(max_new_tokens=POSITIONS - 8)
        try:
            for _, chunk in client.generate_stream([[1, 2, 3]], sampling, timeout_s=600):
                rid.append(chunk.request_id)
                first.set()
        finally:
            first.set()
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert first.wait(60) and rid, "the long request never produced a token"
        yield
        assert not done.is_set(), "the long request ended before the block did"
    finally:
        if rid:
            engine.abort(rid[0])
        thread.join(30)
        client.close()


def busy_config(**kw) -> SyncConfig:
    return SyncConfig(
        transport="ipc",
        load_mode="in_place",
        pause_mode=None,
        idle_timeout_s=IDLE_TIMEOUT_S,
        timeout_s=TIMEOUT_S,
        bucket_mb=0.02,
        **kw,
    )


def test_a_busy_engine_that_fails_its_idle_wait_does_not_stall_the_push(engines, ckpt, tmp_path):
    idle, busy = engines
    version = max(e.info().weight_version for e in engines) + 1
    before = busy.fingerprints()
    tokens = [o.output_ids for o in busy.generate(PROMPTS, greedy())]
    pusher = WeightPusher(busy_config(), {"idle": idle.endpoint, "busy": busy.endpoint}, tmp_path)
    try:
        with generating(busy):
            start = time.monotonic()
            report = pusher.push(trainer_weights(ckpt, version), version)
            took = time.monotonic() - start
        print(f"push to the idle engine took {took:.2f}s beside the busy one")
        assert report.succeeded == ["idle"] and report.failed == ["busy"], report.summary()
        assert "not idle" in report.engines["busy"].message
        assert took < TIMEOUT_S / 2, f"the push waited {took:.1f}s for the busy engine"
        assert pusher.mismatches(trainer_weights(ckpt, version))["idle"] == []
    finally:
        pusher.close()
    assert busy.fingerprints() == before  # old bytes, old version, nothing in flight
    assert [o.output_ids for o in busy.generate(PROMPTS, greedy())] == tokens


def test_a_sharded_push_leaves_a_busy_engine_on_its_old_bytes(engines, ckpt, tmp_path):
    idle, busy = engines
    version = max(e.info().weight_version for e in engines) + 1
    before = busy.fingerprints()
    tokens = [o.output_ids for o in busy.generate(PROMPTS, greedy())]
    endpoints = {"idle": idle.endpoint, "busy": busy.endpoint}
    with generating(busy):
        results = run_ranks(
            2, host_store(), ckpt, endpoints, busy_config(), tmp_path, versions=(version,)
        )
    for rank, result in results.items():
        assert result is not None and "error" not in result, (rank, result)
    report = results[0]["pushes"][0]
    assert report["failed"] == ["busy"], report
    assert "not idle" in report["engines"]["busy"]["message"]
    assert results[1]["pushes"][0]["bytes_written"] > 0
    assert busy.fingerprints() == before  # exactly the old checkpoint's bytes, old version
    assert [o.output_ids for o in busy.generate(PROMPTS, greedy())] == tokens
    got = idle.fingerprints()
    assert got.weight_version == version and not got.weights_incomplete
    want = {n: tensor_fingerprint(t) for n, t in trainer_weights(ckpt, version).items()}
    assert got.fingerprints == want  # fp32 engines: every rank's rows, bit for bit
