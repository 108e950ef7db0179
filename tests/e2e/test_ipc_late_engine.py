"""An engine that accepts an ipc push too late commits nothing of it. Two real engines behind
one `WeightPusher`; one is frozen (SIGSTOP) across the announcement, so its accept arrives
after `timeout_s`, and thawed while the pusher lives. Before membership was explicit, the
thawed engine saw the control counters the pusher had advanced for the other engine, took
them for its own bytes arriving, and labelled its old weights (one-copy path: nobody wrote
its store) with the new version, serving the previous checkpoint's tokens under it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from infer_side.process.client import EngineClient, launch_engine
from rlsync.config import SyncConfig
from rlsync.wire.protocol import GetWeightsFingerprint, WeightFingerprints
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = [launch_engine(ckpt, kv_tokens=256, threads=1) for _ in range(2)]
    yield clients
    for client in clients:
        client.close()


def freeze(engine: EngineClient) -> None:
    engine.process.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{engine.process.pid}/stat")
    while stat.read_text().split(")")[1].split()[0] != "T":
        time.sleep(0.01)  # until the kernel has it stopped


def settled_through(pusher: WeightPusher, name: str, deadline_s: float) -> WeightFingerprints:
    """The engine's state once the late announcement is over. Asked over the pusher's own
    connection, so the engine reads this only after that announcement (one socket keeps its
    order): an answer without an update in flight means the late update has ended."""
    client = pusher.engines.clients[name]
    deadline = time.monotonic() + deadline_s
    while True:
        reply = client.call(GetWeightsFingerprint(names=[]), timeout_s=10)
        assert isinstance(reply, WeightFingerprints), reply
        if not reply.update_in_progress or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
def test_an_engine_thawed_after_the_push_keeps_its_version_and_its_bytes(
    engines, ckpt, tmp_path, load_mode
):
    on_time, late = engines
    version = max(e.info().weight_version for e in engines) + 1
    before = late.fingerprints()
    tokens = [o.output_ids for o in late.generate(PROMPTS, greedy())]
    cfg = SyncConfig(transport="ipc", load_mode=load_mode, bucket_mb=0.02, timeout_s=TIMEOUT_S)
    pusher = WeightPusher(cfg, {"on_time": on_time.endpoint, "late": late.endpoint}, tmp_path)
    try:
        freeze(late)
        start = time.monotonic()
        try:
            report = pusher.push(trainer_weights(ckpt, version), version)
        finally:
            late.process.send_signal(signal.SIGCONT)
        print(f"{load_mode}: push beside a frozen engine took {time.monotonic() - start:.2f}s")
        assert report.succeeded == ["on_time"] and report.failed == ["late"], report.summary()
        info = settled_through(pusher, "late", 4 * TIMEOUT_S + 10)
        assert not info.update_in_progress
        assert (info.weight_version, info.weights_incomplete) == (before.weight_version, False)
        assert late.fingerprints() == before
        assert [o.output_ids for o in late.generate(PROMPTS, greedy())] == tokens
        assert pusher.mismatches(trainer_weights(ckpt, version)) == {"on_time": []}
    finally:
        pusher.close()
