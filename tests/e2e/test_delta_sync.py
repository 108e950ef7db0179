"""Delta pushes end to end (`sync.delta`): a real WeightPusher sends only what changed to real
engine processes over every transport and load mode, and the engines must hold the trainer's
weights bit for bit after every push; an engine off the pusher's base gets a full push, a
delta an engine cannot apply is sent again in full, and a pusher killed mid-delta leaves the
engine on its old version."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.config import SyncConfig
from tests.checkpoints import make_hf_checkpoint
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.pusher import WeightPusher

TRANSPORTS = ["broadcast", "ipc", "disk"]
TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("bf16"), seed=6, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def engines(ckpt):
    clients = {f"engine{i}": launch_engine(ckpt, kv_tokens=256, threads=1) for i in range(2)}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def bf16_engine(bf16_ckpt):
    client = launch_engine(bf16_ckpt, kv_tokens=256, threads=1)
    yield {"bf16": client}
    client.close()


@pytest.fixture(scope="module")
def versions():
    return itertools.count(1)


def delta_pusher(engines, tmp_path, transport, **kw) -> WeightPusher:
    cfg = SyncConfig(
        transport=transport,
        bucket_mb=kw.pop("bucket_mb", 0.02),
        timeout_s=kw.pop("timeout_s", 20.0),
        delta=True,
        delta_max_changed=kw.pop("delta_max_changed", 0.5),  # sparse up to the 20% steps
        **kw,
    )
    return WeightPusher(cfg, {n: c.endpoint for n, c in engines.items()}, tmp_path)


def sparse_step(weights, fraction: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The next version: about `fraction` of each tensor's elements moved a little."""
    out = {}
    for name, t in weights.items():
        flat = t.clone().reshape(-1)
        hit = torch.rand(flat.shape, generator=gen) < fraction
        flat[hit] = (flat[hit].float() * 1.05 + 1e-2).to(t.dtype)
        out[name] = flat.reshape(t.shape)
    return out


def current_version(engines) -> int:
    return max(c.info().weight_version for c in engines.values())


def run_chain(engines, tmp_path, transport, load_mode, weights, versions, pushes=6):
    gen = torch.Generator().manual_seed(len(transport) + len(load_mode))
    pusher = delta_pusher(engines, tmp_path, transport, load_mode=load_mode)
    try:
        first = pusher.push(weights, next(versions))
        assert first.failed == [] and first.delta.startswith("full: no base yet")
        for step in range(pushes):
            weights = sparse_step(weights, [0.002, 0.02, 0.2][step % 3], gen)
            report = pusher.push(weights, next(versions))
            assert report.failed == [], report.summary()
            assert report.delta == "delta"
            assert 0 < report.changed_fraction < 1
            assert report.wire_bytes < report.bytes * (0.2 if step % 3 < 2 else 0.9)
            assert pusher.mismatches(weights) == {n: [] for n in engines}
    finally:
        pusher.close()
    return weights


@pytest.mark.parametrize("load_mode", ["in_place", "shadow"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_chain_of_delta_pushes_is_bit_exact(
    engines, ckpt, versions, transport, load_mode, tmp_path
):
    v = current_version(engines) + 1
    weights = run_chain(engines, tmp_path, transport, load_mode, trainer_weights(ckpt, v), versions)
    outs = [c.generate(PROMPTS, greedy()) for c in engines.values()]
    assert outs[0][0].output_ids == outs[1][0].output_ids  # same bytes, same tokens
    assert all(o.error == "" for o in outs[0])
    assert weights  # the chain ran


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bf16_deltas_send_only_the_changed_values_bit_exact(
    bf16_engine, bf16_ckpt, transport, tmp_path
):
    versions = itertools.count(current_version(bf16_engine) + 1)
    mode = "shadow" if transport == "ipc" else "in_place"
    run_chain(bf16_engine, tmp_path, transport, mode, trainer_weights(bf16_ckpt, 1), versions)


def test_an_engine_off_the_base_gets_a_full_push_with_the_reason(engines, ckpt, versions, tmp_path):
    gen = torch.Generator().manual_seed(11)
    weights = trainer_weights(ckpt, 40)
    pusher = delta_pusher(engines, tmp_path, "ipc")
    try:
        pusher.push(weights, next(versions))
        weights = sparse_step(weights, 0.01, gen)
        assert pusher.push(weights, next(versions)).delta == "delta"
        other_version = next(versions)  # someone else pushes engine0 past the base
        other = WeightPusher(
            SyncConfig(transport="ipc", bucket_mb=0.02),
            {"engine0": engines["engine0"].endpoint},
            tmp_path / "other",
        )
        try:
            assert other.push(trainer_weights(ckpt, 41), other_version).failed == []
        finally:
            other.close()
        weights = sparse_step(weights, 0.01, gen)
        report = pusher.push(weights, next(versions))
        assert report.delta == (
            f"full: engine0 holds version {other_version}, the base is {other_version - 1}"
        )
        assert report.failed == [] and report.changed_fraction == 1.0
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
        weights = sparse_step(weights, 0.01, gen)
        assert pusher.push(weights, next(versions)).delta == "delta"  # back on the base
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_a_delta_the_engines_cannot_apply_is_pushed_again_in_full(
    engines, ckpt, versions, transport, tmp_path
):
    gen = torch.Generator().manual_seed(12)
    weights = trainer_weights(ckpt, 50)
    # short timeout: an ipc sender waits that long for engines that failed mid-push
    pusher = delta_pusher(engines, tmp_path, transport, timeout_s=TIMEOUT_S)
    try:
        pusher.push(weights, next(versions))
        encoder = pusher.delta.encoder
        last = encoder.plan.buckets[-1]
        spec = last.tensors[0]
        # the pusher's base drifts at one byte (as if its copy were corrupt); the engines hold
        # the real bytes there, so a delta touching that element must be refused
        encoder.base[-1][spec.offset] ^= 0x55
        weights = sparse_step(weights, 0.01, gen)
        weights[spec.name].view(-1)[0] += 1.0  # the corrupt position is a changed one
        version = next(versions)
        report = pusher.push(weights, version)
        assert report.delta.startswith("delta; full again to engine0, engine1"), report.delta
        assert "differ from the pusher's base" in report.delta
        assert report.failed == [], report.summary()
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
        assert all(c.info().weight_version == version for c in engines.values())
        weights = sparse_step(weights, 0.01, gen)
        assert pusher.push(weights, next(versions)).delta == "delta"  # the base is sound again
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()


def test_a_full_push_every_n_versions(engines, ckpt, versions, tmp_path):
    gen = torch.Generator().manual_seed(13)
    weights = trainer_weights(ckpt, 60)
    pusher = delta_pusher(engines, tmp_path, "ipc", delta_full_every=3)
    kinds = []
    try:
        for _ in range(7):
            weights = sparse_step(weights, 0.01, gen)
            kinds.append(pusher.push(weights, next(versions)).delta.split(" (")[0])
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()
    periodic = "full: periodic full push"
    assert kinds == ["full: no base yet", "delta", "delta", periodic, "delta", "delta", periodic]


# A delta-mode pusher in its own process: a full push, then a delta whose encoding stalls
# after the second bucket, so the test can SIGKILL it mid-delta.
SLOW_DELTA_PUSHER = r"""
import sys, time, torch
from rlsync.config import SyncConfig
from rlsync.plan.delta_encode import DeltaEncoder
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync.pusher import WeightPusher

endpoint, transport, load_mode, version, ckpt, timeout = *sys.argv[1:6], float(sys.argv[6])
cfg = SyncConfig(
    transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=timeout, delta=True
)
pusher = WeightPusher(cfg, {"engine": endpoint}, "/tmp")
weights = trainer_weights(ckpt, int(version))
pusher.push(weights, int(version))
print("BASE", flush=True)
real, done = DeltaEncoder.encode, []
def slow(self, g, tensors, full):
    out = real(self, g, tensors, full=full)
    done.append(g)
    if len(done) == 3:
        print("ENCODED", flush=True)
        time.sleep(600)
    return out
DeltaEncoder.encode = slow
pusher.push({n: t + 0.5 for n, t in weights.items()}, int(version) + 1)
"""


@pytest.mark.parametrize(
    "transport,load_mode", [("ipc", "shadow"), ("broadcast", "shadow"), ("ipc", "in_place")]
)
def test_a_pusher_killed_mid_delta_leaves_the_engine_on_its_old_version(
    bf16_engine, bf16_ckpt, transport, load_mode, tmp_path
):
    engine, ckpt = bf16_engine["bf16"], bf16_ckpt
    base = engine.info().weight_version + 1
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_DELTA_PUSHER, engine.endpoint, transport, load_mode]
        + [str(base), str(ckpt), str(TIMEOUT_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout.readline().strip() == b"BASE", proc.stderr.read().decode()[-2000:]
        before = engine.fingerprints()
        tokens = [o.output_ids for o in engine.generate(PROMPTS, greedy())]
        assert proc.stdout.readline().strip() == b"ENCODED"
        time.sleep(1.0)  # the engine applies the payloads it got (a busy box is slow)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    info = _settled(engine, 2 * TIMEOUT_S + 10)
    assert info.weight_version == before.weight_version == base
    if load_mode == "shadow":  # the old version serves on, byte for byte
        # (bytes only: `before` may have been taken once the delta was already announced)
        assert engine.fingerprints().fingerprints == before.fingerprints
        assert [o.output_ids for o in engine.generate(PROMPTS, greedy())] == tokens
    else:  # payloads landed in the live weights: refuse rather than serve a mix
        assert info.weights_incomplete is True
        assert "weights incomplete" in engine.generate([[1, 2, 3]], greedy())[0].error
    weights = trainer_weights(ckpt, 9)
    pusher = delta_pusher({"engine": engine}, tmp_path, transport, load_mode=load_mode)
    try:  # a new pusher has no base: its first push is full and repairs everything
        report = pusher.push(weights, base + 2)
        assert report.failed == [] and report.delta.startswith("full: no base yet")
        assert pusher.mismatches(weights) == {"engine": []}
    finally:
        pusher.close()


def _settled(engine, deadline_s: float):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        info = engine.fingerprints(names=[])
        if not info.update_in_progress:
            return info
        time.sleep(0.2)
    raise AssertionError(f"update still in flight after {deadline_s}s")


def test_dense_changes_turn_deltas_off_for_a_while(engines, ckpt, versions, tmp_path):
    """A delta that finds every bucket dense (Adam on fp32 weights) is followed by plain
    pushes (no payloads, no base kept), then a full push takes a base and deltas resume."""
    from trainer_side.sync.delta_push import DENSE_PLAIN_PUSHES

    gen = torch.Generator().manual_seed(14)
    weights = trainer_weights(ckpt, 70)
    pusher = delta_pusher(engines, tmp_path, "ipc", delta_max_changed=0.02)
    kinds = []
    try:
        pusher.push(weights, next(versions))
        weights = {n: t * 1.01 for n, t in weights.items()}  # every element moves
        report = pusher.push(weights, next(versions))
        assert report.delta == "delta" and report.changed_fraction > 0.99
        for _ in range(DENSE_PLAIN_PUSHES + 2):
            weights = sparse_step(weights, 0.005, gen)
            kinds.append(pusher.push(weights, next(versions)).delta.split(":")[0])
            assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
    finally:
        pusher.close()
    assert kinds == ["full"] * (DENSE_PLAIN_PUSHES + 1) + ["delta"]


def test_a_bit_flipped_on_the_way_is_caught_and_the_push_repeated_in_full(
    engines, ckpt, versions, tmp_path, monkeypatch
):
    """Fault injection on the wire: one bit of a SPARSE payload flips after its checksum was
    taken (in the shared buffer). Every engine refuses that payload before writing it, and
    the pusher sends the version again, whole; the engines end bit-exact."""
    from rlsync.plan.delta import SPARSE, Payload

    real = Payload.write_into
    flipped = []

    def corrupt(self, out):
        real(self, out)
        if self.kind == SPARSE and self.changed and not flipped:
            out[self.nbytes - 1] ^= 0x10  # the last value byte
            flipped.append(True)

    gen = torch.Generator().manual_seed(15)
    weights = trainer_weights(ckpt, 80)
    pusher = delta_pusher(engines, tmp_path, "ipc", timeout_s=TIMEOUT_S, load_mode="shadow")
    try:
        pusher.push(weights, next(versions))
        before = {n: c.fingerprints() for n, c in engines.items()}
        monkeypatch.setattr(Payload, "write_into", corrupt)
        weights = sparse_step(weights, 0.01, gen)
        version = next(versions)
        report = pusher.push(weights, version)
        assert flipped
        assert report.delta.startswith("delta; full again to engine0, engine1"), report.delta
        assert "body checksum mismatch (corrupt payload)" in report.delta
        assert report.failed == []
        assert pusher.mismatches(weights) == {"engine0": [], "engine1": []}
        assert all(c.info().weight_version == version for c in engines.values())
        assert before["engine0"].weight_version == version - 1
    finally:
        pusher.close()
