"""The one-copy IPC protocol (`IpcSender.push_direct` / `IpcReceiver.receive_direct`) on real
shared memory: engine-owned stores mapped by the sender, engines on threads of this process
(the cross-process path runs in tests/e2e/test_weight_sync.py). The sender writes a store
only once its engine opened it, an engine that never opens is evicted and named, and a
wrong trailer is caught before the engine reports the bucket landed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from infer_side.engines.weights import ModelWeights
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import plan_in_store
from rlsync.transports import IntegrityError, TransportError, ipc
from rlsync.transports.base import WeightWriter
from rlsync.transports.shm import ShmReceiver, ShmSender
from rlsync.transports.store import MappedStore
from rlsync.wire.protocol import UpdateWeightsFromIPC

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2)


class Landed:
    """A WriteSink that records what landed (the engine side of the test)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.buckets = 0

    def written(self, name: str) -> None:
        self.names.append(name)

    def bucket_done(self) -> None:
        self.buckets += 1


@pytest.fixture
def setup():
    stores = [ModelWeights.empty(CFG, torch.bfloat16, exposed=True) for _ in range(2)]
    specs = [(n, d, s) for n, (d, s) in stores[0].expected().items()]
    offsets = {n: off for n, (off, _) in stores[0].layout().items()}
    plan = plan_in_store(specs, offsets, bucket_bytes=16 << 10)
    sender = ShmSender(None, num_engines=2, capacity_bytes=8 * len(plan.buckets))
    mapped = [MappedStore(s.store_ref) for s in stores]
    g = torch.Generator().manual_seed(7)
    tensors = {n: torch.randn(s, generator=g) for n, (_, s) in stores[0].expected().items()}
    yield plan, sender, stores, mapped, tensors
    sender.close()
    for m in mapped:
        m.close()
    for s in stores:
        s.close()


def _engine(sender, index, store, plan, push_id, out, *, delay_s=0.0, verify=False):
    """Run one engine's receive_direct on a thread; `out[index]` gets its result."""
    sink = Landed()
    writer = WeightWriter(store.hf_views(), threading.Event(), sink, flat=store.flat)
    out[f"{index} writer"] = writer

    def run():
        reader = ShmReceiver(sender.descriptor(index))
        try:
            time.sleep(delay_s)
            out[f"{index} written before open"] = bool(store.flat.any())
            reader.receive_direct(plan, push_id, writer, verify=verify, timeout_s=5)
            out[index] = ("ok", sink, writer.touched)
        except Exception as exc:  # reported to the test
            out[index] = ("error", exc)
        finally:
            reader.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_each_store_is_written_once_opened_and_lands_bit_exact(setup):
    plan, sender, stores, mapped, tensors = setup
    out: dict = {}
    threads = [
        _engine(sender, 0, stores[0], plan, 1, out, verify=True),
        _engine(sender, 1, stores[1], plan, 1, out, delay_s=0.5, verify=True),
    ]
    stats = sender.push_direct(
        plan, tensors, 1, {0: mapped[0].flat, 1: mapped[1].flat}, verify=True, timeout_s=5
    )
    for t in threads:
        t.join(10)
    assert stats.timed_out_engines == []
    for i, store in enumerate(stores):
        status, sink, touched = out[i]
        assert status == "ok" and touched and sink.buckets == len(plan.buckets)
        assert sorted(sink.names) == sorted(tensors)
        for name, view in store.hf_views().items():
            assert torch.equal(view, tensors[name].bfloat16()), name
    # no store is written before every engine opened its own (engine 1 opened 0.5 s late)
    assert out["0 written before open"] is False and out["1 written before open"] is False


def test_an_engine_that_never_opens_is_evicted_and_named(setup):
    plan, sender, stores, mapped, tensors = setup
    out: dict = {}
    thread = _engine(sender, 0, stores[0], plan, 1, out)
    stats = sender.push_direct(
        plan, tensors, 1, {0: mapped[0].flat, 1: mapped[1].flat}, timeout_s=0.5
    )
    thread.join(10)
    assert stats.timed_out_engines == [1]
    assert out[0][0] == "ok"
    assert not stores[1].flat.any()  # nothing was written into the store that never opened


def test_a_wrong_trailer_is_caught_naming_the_bucket(setup, monkeypatch):
    plan, sender, stores, mapped, tensors = setup
    real, calls = ipc.fingerprint, []

    def off_by_one(buf):
        calls.append(1)
        return real(buf) + (1 if len(calls) == 2 else 0)

    monkeypatch.setattr(ipc, "fingerprint", off_by_one)
    out: dict = {}
    thread = _engine(sender, 0, stores[0], plan, 1, out, verify=True)
    stats = sender.push_direct(plan, tensors, 1, {0: mapped[0].flat}, verify=True, timeout_s=1)
    thread.join(10)
    assert stats.timed_out_engines == [0]  # it stopped consuming at bucket 1
    status, exc = out[0]
    assert status == "error" and isinstance(exc, IntegrityError) and exc.bucket == 1


def test_an_engine_left_out_of_a_push_fails_before_it_opens_its_store(setup):
    """Engine 1 accepted too late (frozen, then thawed): the pusher wrote only engine 0's
    store, and engine 1 receives when the counters already say "every bucket ready"."""
    plan, sender, stores, mapped, tensors = setup
    out: dict = {}
    thread = _engine(sender, 0, stores[0], plan, 1, out)
    stats = sender.push_direct(plan, tensors, 1, {0: mapped[0].flat}, timeout_s=5)
    thread.join(10)
    assert stats.timed_out_engines == [] and out[0][0] == "ok"
    _engine(sender, 1, stores[1], plan, 1, out).join(10)
    status, exc = out[1]
    assert status == "error" and isinstance(exc, TransportError)
    assert "engine 1 is not taking part in push 1" in str(exc)
    assert not out["1 writer"].touched and not out["1 writer"].exposed
    assert not stores[1].flat.any()


def test_an_engine_that_declines_is_left_behind_at_once(setup):
    """Engine 1 accepted, then its update failed before it opened its store (say its wait for
    idle ran out): it says so, and the push to engine 0 does not wait timeout_s for it."""
    plan, sender, stores, mapped, tensors = setup
    out: dict = {}
    thread = _engine(sender, 0, stores[0], plan, 1, out)
    ipc.Receiver().failed(UpdateWeightsFromIPC(buffer=sender.descriptor(1), plan=plan, push_id=1))
    start = time.monotonic()
    stats = sender.push_direct(
        plan, tensors, 1, {0: mapped[0].flat, 1: mapped[1].flat}, timeout_s=30
    )
    assert time.monotonic() - start < 15  # a bound far below timeout_s, not a speed goal
    thread.join(10)
    assert stats.timed_out_engines == [1] and out[0][0] == "ok"
    assert not stores[1].flat.any()
