"""Every kind of push delta mode makes, over every transport, checked on real engines.

One WeightPusher in delta mode drives two real engine processes through the whole matrix:
the first full push (it takes the base), sparse deltas, a dense delta (every element moved,
as under Adam on fp32) and the plain pushes it turns deltas off for, the full push that
takes a base again, the periodic full push (`delta_full_every`), a push one engine misses
(frozen) and the full push that brings it back. After every push each engine must hold the
trainer's bytes exactly (fingerprints) and the report must say which kind it was
(`report.delta`). The kind is decided once by the pusher and every sender acts on it: a
plain push in delta mode over disk writes its files (it used to announce the previous
payload directory, and every engine refused).
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync import delta_push
from trainer_side.sync.pusher import WeightPusher

TIMEOUT_S = 2.0
NO_BASE = "full: no base yet"
PLAIN = "full: plain: the last delta found 100% changed; deltas again after"
MATRIX = [  # (what the trainer does, what the report must say)
    ("first", NO_BASE),
    ("sparse", "delta"),
    ("dense", "delta"),
    ("sparse", f"{PLAIN} 1 more"),
    ("sparse", f"{PLAIN} 0 more"),
    ("sparse", NO_BASE),  # plain pushes keep no base: a full one takes it again
    ("sparse", "delta"),
    ("sparse", "delta"),
    ("sparse", "full: periodic full push (sync.delta_full_every = 3)"),
    ("freeze", "full: engine1 did not report its version"),
    ("sparse", "full: engine1 came back after a missed push"),
    ("sparse", "delta"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=41)


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = {f"engine{i}": launch_engine(ckpt, kv_tokens=256, threads=1) for i in range(2)}
    yield clients
    for client in clients.values():
        client.close()


def next_weights(step: str, weights: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if step == "dense":
        return {n: t * 1.01 for n, t in weights.items()}  # every element moves
    out = {}
    for name, t in weights.items():  # about 1% of the elements move
        flat = t.clone().reshape(-1)
        hit = torch.rand(flat.shape, generator=gen) < 0.01
        flat[hit] = flat[hit] * 1.05 + 1e-2
        out[name] = flat.reshape(t.shape)
    return out


@pytest.mark.parametrize("transport", ["ipc", "broadcast", "disk"])
def test_every_push_kind_of_delta_mode_is_bit_exact_and_reported(
    engines, ckpt, tmp_path, transport, monkeypatch
):
    monkeypatch.setattr(delta_push, "DENSE_PLAIN_PUSHES", 2)  # the matrix, not its length
    cfg = SyncConfig(
        transport=transport,
        bucket_mb=0.02,
        timeout_s=TIMEOUT_S,
        delta=True,
        delta_max_changed=0.5,
        delta_full_every=3,
    )
    pusher = WeightPusher(cfg, {n: c.endpoint for n, c in engines.items()}, tmp_path)
    frozen = engines["engine1"]
    gen = torch.Generator().manual_seed(len(transport))
    weights = trainer_weights(ckpt, 90)
    version = max(c.info().weight_version for c in engines.values())
    try:
        for step, kind in MATRIX:
            version += 1
            weights = next_weights(step, weights, gen)
            if step == "freeze":  # engine1 misses this push: stopped for all of it
                os.kill(frozen.process.pid, signal.SIGSTOP)
                try:
                    report = pusher.push(weights, version)
                finally:
                    os.kill(frozen.process.pid, signal.SIGCONT)
                assert report.failed == ["engine1"], report.summary()
                assert pusher.mismatches(weights)["engine0"] == []
                assert frozen.info().weight_version == version - 1  # it dropped this one
            else:
                report = pusher.push(weights, version)
                assert report.failed == [], (step, report.summary())
                assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}, step
            assert report.delta.startswith(kind), (step, report.delta)
            if kind == "delta" and step == "sparse":
                assert report.wire_bytes < report.bytes / 4
            if kind.startswith(PLAIN):  # the plan's own bytes, through the fastest path
                assert report.wire_bytes == report.bytes and report.changed_fraction == 1.0
            if step == "dense":
                assert report.changed_fraction > 0.99
    finally:
        pusher.close()
    outs = [c.generate(PROMPTS, greedy()) for c in engines.values()]
    assert [o.output_ids for o in outs[0]] == [o.output_ids for o in outs[1]]
    assert {c.info().weight_version for c in engines.values()} == {version}
