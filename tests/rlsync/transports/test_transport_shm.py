"""Shared-memory IPC transport: real engine processes (spawn), real POSIX shm segments.

Engines get their descriptor as an encoded UpdateWeightsFromIPC frame (the real wire path)
and report back through a JSON file. The helpers at the top are shared with the other
transport tests.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsync.plan.buckets import bucket_views, dtype_name, plan_buckets
from rlsync.transports import IntegrityError, TransportError, TransportTimeout, integrity
from rlsync.transports.control import remove_orphan_segments
from rlsync.transports.shm import ShmReceiver, ShmSender
from rlsync.wire import codec
from rlsync.wire.protocol import BucketPlan, UpdateWeightsFromIPC

SPAWN = mp.get_context("spawn")


# ---------------------------------------------------------------- shared helpers


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    """~200 KB of mixed dtypes (fp32, bf16, int64, bool, fp8, 0-dim), different per seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(128, 96, generator=g),
        "layers.0.attn.bf16": torch.randn(130, 70, generator=g).bfloat16(),
        "layers.0.ids": torch.randint(-(2**40), 2**40, (1500,), generator=g),
        "layers.0.mask": torch.rand(777, generator=g) > 0.5,
        "layers.0.fp8": torch.randn(513, generator=g).to(torch.float8_e4m3fn),
        "layers.1.mlp": torch.randn(64, 200, generator=g),
        "layers.1.scale": torch.randn((), generator=g),
        "norm.weight": torch.randn(96, generator=g),
    }


def make_plan(seed: int = 0) -> BucketPlan:
    specs = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in make_tensors(seed).items()]
    return plan_buckets(specs, bucket_bytes=24 << 10)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def mismatches(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose bytes, dtype or shape differ (or that are missing/extra)."""
    bad = sorted(set(got) ^ set(want))
    for name in set(got) & set(want):
        a, b = got[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(as_bytes(a), as_bytes(b)):
            bad.append(name)
    return bad


def collector(store: dict[str, torch.Tensor]) -> Any:
    """on_bucket that clones every tensor of the bucket into `store`."""

    def on_bucket(index: int, bucket: Any, buf: torch.Tensor) -> None:
        for name, view in bucket_views(bucket, buf):
            store[name] = view.clone()

    return on_bucket


def error_report(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "message": str(e), "bucket": getattr(e, "bucket", None)}


def write_json(path: str, value: Any) -> None:
    Path(path + ".tmp").write_text(json.dumps(value))
    os.replace(path + ".tmp", path)


def start(target: Any, *args: Any) -> Any:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def join_all(procs: list[Any], timeout_s: float = 60.0) -> None:
    """Join our own children; kill (by pid) any that outlive the deadline, then fail."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
        proc.join(5)
    assert not alive, f"children still running after {timeout_s}s"


def wait_for_file(path: Path, timeout_s: float, proc: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s}s"
        if proc is not None and proc.exitcode is not None and not path.exists():
            raise AssertionError(f"child exited ({proc.exitcode}) before writing {path}")
        time.sleep(0.02)


class KillAt(Mapping[str, torch.Tensor]):
    """Tensors that SIGKILL their own process when `victim` is packed: a sender dying mid-push."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], victim: str):
        self.tensors, self.victim = tensors, victim

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def victim_in_bucket(plan: BucketPlan, index: int) -> str:
    return plan.buckets[index].tensors[0].name


def own_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"rlsync-{os.getpid()}-")}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- engine processes


def _engine(frame: bytes, pushes: list[int], out: str, verify: bool, stall_at: int) -> None:
    """Attach once, receive each push, compare with make_tensors(push id); report to `out`."""
    msg = codec.decode(frame)
    assert isinstance(msg, UpdateWeightsFromIPC)
    fds = fd_count()
    receiver = ShmReceiver(msg.buffer)
    write_json(out + ".ready", {})
    report: dict[str, Any] = {"bad": [], "received": 0}
    try:
        for push_id in pushes:
            got: dict[str, torch.Tensor] = {}
            on_bucket = collector(got)
            if stall_at >= 0:  # a reader that gets stuck after loading bucket `stall_at`

                def on_bucket(i: int, b: Any, buf: torch.Tensor, inner: Any = on_bucket) -> None:
                    inner(i, b, buf)
                    if i == stall_at:
                        time.sleep(5.0)

            receiver.attach(msg.buffer)  # cached: no re-map
            receiver.receive(msg.plan, push_id, on_bucket, verify=verify, timeout_s=10.0)
            report["bad"] += mismatches(got, make_tensors(push_id))
            report["received"] += 1
    except TransportError as e:
        report.update(error_report(e))
    receiver.close()
    report["fd_delta"] = fd_count() - fds
    write_json(out, report)


def _engine_frame(sender: ShmSender, engine: int, plan: BucketPlan) -> bytes:
    return codec.encode(
        UpdateWeightsFromIPC(buffer=sender.descriptor(engine), plan=plan, push_id=0)
    )


def _run_engines(
    tmp_path: Path,
    sender: ShmSender,
    plan: BucketPlan,
    n: int,
    pushes: list[int],
    verify: bool = False,
    stall: dict[int, int] | None = None,
) -> tuple[list, list[str]]:
    outs = [str(tmp_path / f"engine{e}.json") for e in range(n)]
    procs = [
        start(
            _engine,
            _engine_frame(sender, e, plan),
            pushes,
            outs[e],
            verify,
            (stall or {}).get(e, -1),
        )
        for e in range(n)
    ]
    for out, proc in zip(outs, procs, strict=True):  # attached and waiting: no start-up race
        wait_for_file(Path(out + ".ready"), 60, proc)
    return procs, outs


def _results(outs: list[str]) -> list[dict[str, Any]]:
    return [json.loads(Path(o).read_text()) for o in outs]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("num_engines", [1, 2])
def test_pushes_arrive_bit_exact(tmp_path: Path, num_engines: int) -> None:
    plan = make_plan()
    assert len(plan.buckets) >= 5
    sender = ShmSender(plan, num_engines=num_engines)
    try:
        pushes = [1, 2, 3]
        procs, outs = _run_engines(tmp_path, sender, plan, num_engines, pushes, verify=True)
        for push_id in pushes:
            stats = sender.push(plan, make_tensors(push_id), push_id, verify=True, timeout_s=30)
            assert stats.timed_out_engines == [] and stats.buckets == len(plan.buckets)
        join_all(procs)
    finally:
        sender.close()
    for report in _results(outs):
        assert report == {"bad": [], "received": 3, "fd_delta": 0}


def test_verify_names_the_corrupted_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan()

    seal = integrity.seal

    def seal_then_flip_a_bit(index: int, buf: torch.Tensor, nbytes: int) -> None:
        seal(index, buf, nbytes)
        if index == 2:  # corrupted after sealing: in flight, as the engine sees it
            buf[5] ^= 1

    monkeypatch.setattr(integrity, "seal", seal_then_flip_a_bit)
    sender = ShmSender(plan, num_engines=1)
    try:
        procs, outs = _run_engines(tmp_path, sender, plan, 1, [1], verify=True)
        stats = sender.push(plan, make_tensors(1), 1, verify=True, timeout_s=1.0)
        join_all(procs)
    finally:
        sender.close()
    report = _results(outs)[0]
    assert report["error"] == IntegrityError.__name__ and report["bucket"] == 2
    assert "bucket 2" in report["message"]
    assert stats.timed_out_engines == [0]  # it stopped consuming at the bad bucket


def test_stuck_reader_is_reported_and_the_other_gets_everything(tmp_path: Path) -> None:
    plan = make_plan()
    sender = ShmSender(plan, num_engines=2)
    try:
        procs, outs = _run_engines(tmp_path, sender, plan, 2, [1], stall={1: 0})
        t0 = time.monotonic()
        stats = sender.push(plan, make_tensors(1), 1, timeout_s=1.5)
        assert time.monotonic() - t0 < 4.5  # gave up on engine 1 before its stall ended
        join_all(procs)
    finally:
        sender.close()
    assert stats.timed_out_engines == [1]
    healthy, stuck = _results(outs)
    assert healthy == {"bad": [], "received": 1, "fd_delta": 0}
    assert stuck["error"] == TransportTimeout.__name__ and "evicted" in stuck["message"]


def test_dead_reader_is_reported(tmp_path: Path) -> None:
    plan = make_plan()
    sender = ShmSender(plan, num_engines=2)
    try:
        procs, outs = _run_engines(tmp_path, sender, plan, 1, [1])  # engine 1 never shows up
        stats = sender.push(plan, make_tensors(1), 1, timeout_s=1.0)
        join_all(procs)
    finally:
        sender.close()
    assert stats.timed_out_engines == [1]
    assert _results(outs)[0] == {"bad": [], "received": 1, "fd_delta": 0}


def _killed_sender(plan_frame: bytes, out: str) -> None:
    plan = codec.decode(plan_frame).plan
    sender = ShmSender(plan, num_engines=1)
    write_json(
        out,
        {
            "frame": codec.encode(
                UpdateWeightsFromIPC(buffer=sender.descriptor(0), plan=plan, push_id=1)
            ).hex()
        },
    )
    time.sleep(0.5)  # let the engine attach and start waiting
    sender.push(plan, KillAt(make_tensors(1), victim_in_bucket(plan, 3)), 1, timeout_s=30)


def test_sigkilled_sender_makes_the_engine_raise_at_once(tmp_path: Path) -> None:
    """The engine sees the sender's flock on the control segment go (not its timeout_s)."""
    plan = make_plan()
    out = tmp_path / "sender.json"
    proc = start(_killed_sender, codec.encode(UpdateWeightsFromIPC(plan=plan)), str(out))
    wait_for_file(out, 60, proc)
    msg = codec.decode(bytes.fromhex(json.loads(out.read_text())["frame"]))
    receiver = ShmReceiver(msg.buffer)
    got: dict[str, torch.Tensor] = {}
    t0 = time.monotonic()
    gone = rf"the sender \(pid {proc.pid}\) is gone \(waiting on bucket 3\)"
    with pytest.raises(TransportError, match=gone):
        receiver.receive(msg.plan, 1, collector(got), timeout_s=30)
    assert time.monotonic() - t0 < 5.0  # a bound far below timeout_s, not a speed goal
    receiver.close()
    join_all([proc])
    assert proc.exitcode == -signal.SIGKILL
    assert len(got) == sum(len(b.tensors) for b in msg.plan.buckets[:3])
    removed = remove_orphan_segments()
    assert {msg.buffer.name, msg.buffer.control_name} <= set(removed)


def test_sender_failure_aborts_the_push_for_engines(tmp_path: Path) -> None:
    plan = make_plan()
    sender = ShmSender(plan, num_engines=1)
    try:
        procs, outs = _run_engines(tmp_path, sender, plan, 1, [1])
        tensors = make_tensors(1)
        del tensors[victim_in_bucket(plan, 2)]
        with pytest.raises(KeyError):
            sender.push(plan, tensors, 1, timeout_s=5)
        join_all(procs)
    finally:
        sender.close()
    report = _results(outs)[0]
    assert report["error"] == TransportError.__name__ and "aborted" in report["message"]


def test_stale_push_id_and_bad_names_are_refused() -> None:
    plan = make_plan()
    sender = ShmSender(plan, num_engines=1)
    receiver = ShmReceiver(sender.descriptor(0))
    try:
        sender.push(plan, make_tensors(5), 5, wait=False)
        with pytest.raises(TransportError, match="sender is on push 5"):
            receiver.receive(plan, 4, collector({}), timeout_s=1)
        with pytest.raises(ValueError, match="must be greater"):
            sender.push(plan, make_tensors(5), 5, timeout_s=0.2)
        empty = BucketPlan(buckets=[])
        assert sender.push(empty, {}, 6, timeout_s=0.2).buckets == 0
        assert receiver.receive(empty, 6, collector({}), timeout_s=0.2).buckets == 0
        bad = sender.descriptor(0)
        bad.name = "../../etc/passwd"
        with pytest.raises(TransportError, match="invalid segment name"):
            ShmReceiver(bad)
    finally:
        receiver.close()
        sender.close()


def test_an_engine_left_out_of_a_push_reads_nothing_of_it() -> None:
    """Engine 1 accepted too late: the push went to engine 0 alone, and engine 1's receive
    starts once the counters were advanced for engine 0."""
    plan = make_plan()
    sender = ShmSender(plan, num_engines=2)
    on_time, late = ShmReceiver(sender.descriptor(0)), ShmReceiver(sender.descriptor(1))
    try:
        sender.push(plan, make_tensors(1), 1, readers=[0], wait=False)
        got: dict[str, torch.Tensor] = {}
        on_time.receive(plan, 1, collector(got), timeout_s=5)
        assert mismatches(got, make_tensors(1)) == []
        read: dict[str, torch.Tensor] = {}
        with pytest.raises(TransportError, match="engine 1 is not taking part in push 1"):
            late.receive(plan, 1, collector(read), timeout_s=5)
        assert read == {}
    finally:
        on_time.close()
        late.close()
        sender.close()


def test_fifty_pushes_and_reopens_leak_nothing() -> None:
    plan = make_plan()
    fds, segments = fd_count(), own_segments()
    sender = ShmSender(plan, num_engines=1)
    receiver = ShmReceiver()
    mapping = None
    for push_id in range(50):
        verify = push_id % 10 == 0
        sender.push(plan, make_tensors(push_id % 3), push_id, verify=verify, wait=False)
        receiver.attach(sender.descriptor(0))
        mapping = mapping or receiver.segment
        assert receiver.segment is mapping  # opened once, never re-mapped
        got: dict[str, torch.Tensor] = {}
        receiver.receive(plan, push_id, collector(got), verify=verify, timeout_s=5)
        assert mismatches(got, make_tensors(push_id % 3)) == []
    receiver.close()
    sender.close()
    for _ in range(10):  # whole sender/receiver lifecycles
        sender = ShmSender(plan, num_engines=2)
        receiver = ShmReceiver(sender.descriptor(1))
        sender.push(plan, make_tensors(0), 0, readers=[1], wait=False)
        receiver.receive(plan, 0, collector({}), timeout_s=5)
        receiver.close()
        sender.close()
    assert fd_count() == fds and own_segments() == segments


def test_sender_geometry_and_fits() -> None:
    plan = make_plan()
    packed = ShmSender(plan, num_engines=3)
    try:
        desc = packed.descriptor(2)
        assert (desc.num_slots, desc.slot_bytes, desc.engine_index) == (1, 0, 2)
        assert packed.fits(plan)
        big = plan_buckets([("x", "float32", (250000,))], bucket_bytes=1 << 20)  # 1 MB
        assert not packed.fits(big)
        with pytest.raises(TransportError, match="needs"):
            packed.push(big, {"x": torch.zeros(250000)}, 0)
    finally:
        packed.close()


def test_a_descriptor_of_a_ring_of_slots_is_refused_by_name() -> None:
    sender = ShmSender(make_plan(), num_engines=1)
    try:
        ring = sender.descriptor(0)
        ring.num_slots, ring.slot_bytes = 4, 64 << 10
        with pytest.raises(TransportError, match="num_slots 4 / slot_bytes 65536"):
            ShmReceiver(ring)
    finally:
        sender.close()
