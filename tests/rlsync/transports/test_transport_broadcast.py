"""Broadcast transport: real gloo groups between this process and spawned engine processes.

The test process is usually rank 0 (the trainer); engines are spawned ranks 1..N that
report what they received through a JSON file.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsync.transports import IntegrityError, TransportError, TransportTimeout, integrity
from rlsync.transports.broadcast import BroadcastGroup, recv_buckets, send_buckets
from rlsync.wire import codec
from rlsync.wire.netutil import free_port
from rlsync.wire.protocol import BucketPlan, UpdateWeightsFromDistributed
from tests.rlsync.transports.test_transport_shm import (
    KillAt,
    collector,
    error_report,
    join_all,
    make_plan,
    make_tensors,
    mismatches,
    start,
    victim_in_bucket,
    write_json,
)

JOIN_S = 90.0  # rendezvous bound: spawned children import torch first (slow on a busy box)


def _verify(push_id: int) -> bool:
    return push_id % 2 == 0


def _plan_frame(plan: BucketPlan) -> bytes:
    return codec.encode(UpdateWeightsFromDistributed(plan=plan))


def _engine(
    rounds: list[list[int]], rank: int, world: int, plan_frame: bytes, pushes: list[int], out: str
) -> None:
    """Rank `rank`: per round, join one group per port (all open at once), receive `pushes`
    on each in turn, then destroy them all."""
    plan = codec.decode(plan_frame).plan
    report: dict[str, Any] = {"bad": [], "received": 0}
    try:
        for ports in rounds:
            groups = [
                BroadcastGroup.create(
                    "127.0.0.1", port, rank, world, timeout_s=JOIN_S, group_name=f"w{port}"
                )
                for port in ports
            ]
            report["default_pg"] = torch.distributed.is_initialized()
            for group in groups:
                for push_id in pushes:
                    got: dict[str, torch.Tensor] = {}
                    recv_buckets(group, plan, collector(got), verify=_verify(push_id), timeout_s=30)
                    report["bad"] += mismatches(got, make_tensors(push_id))
                    report["received"] += 1
            for group in groups:
                group.destroy()
    except TransportError as e:
        report.update(error_report(e))
    write_json(out, report)


def _spawn_engines(
    tmp_path: Path, rounds: list[list[int]], world: int, plan: BucketPlan, pushes: list[int]
) -> tuple[list[Any], list[str]]:
    outs = [str(tmp_path / f"rank{r}.json") for r in range(1, world)]
    procs = [
        start(_engine, rounds, r, world, _plan_frame(plan), pushes, outs[r - 1])
        for r in range(1, world)
    ]
    return procs, outs


def _results(outs: list[str]) -> list[dict[str, Any]]:
    return [json.loads(Path(o).read_text()) for o in outs]


def _send(group: BroadcastGroup, plan: BucketPlan, pushes: list[int]) -> None:
    for push_id in pushes:
        stats = send_buckets(
            group, plan, make_tensors(push_id), verify=_verify(push_id), timeout_s=30
        )
        assert stats.buckets == len(plan.buckets) and stats.nbytes > 0
        assert {"pack", "wait"} <= set(stats.phases)


@pytest.mark.parametrize("engines", [1, 2])
def test_buckets_arrive_bit_exact(tmp_path: Path, engines: int) -> None:
    plan, port, world = make_plan(), free_port(), engines + 1
    procs, outs = _spawn_engines(tmp_path, [[port]], world, plan, [1, 2])
    group = BroadcastGroup.create(
        "127.0.0.1", port, 0, world, timeout_s=JOIN_S, group_name=f"w{port}"
    )
    try:
        assert not torch.distributed.is_initialized()  # never the default group
        _send(group, plan, [1, 2])
    finally:
        group.destroy()
    join_all(procs)
    for report in _results(outs):
        assert report == {"bad": [], "received": 2, "default_pg": False}


def test_groups_coexist_and_are_recreated_in_the_same_processes(tmp_path: Path) -> None:
    plan, ports = make_plan(), [free_port() for _ in range(3)]
    rounds = [ports[:2], ports[2:]]  # two groups side by side, then a fresh one
    procs, outs = _spawn_engines(tmp_path, rounds, 2, plan, [2])
    try:
        for round_ports in rounds:
            groups = [
                BroadcastGroup.create(
                    "127.0.0.1", port, 0, 2, timeout_s=JOIN_S, group_name=f"w{port}"
                )
                for port in round_ports
            ]
            for group in groups:
                _send(group, plan, [2])
            for group in groups:
                group.destroy()
            with pytest.raises(TransportError, match="after destroy"):
                groups[0].broadcast(torch.zeros(1))
    finally:
        join_all(procs)
    assert _results(outs) == [{"bad": [], "received": 3, "default_pg": False}]


def test_verify_names_the_corrupted_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seal = integrity.seal

    def seal_then_flip_a_bit(index: int, buf: torch.Tensor, nbytes: int) -> None:
        seal(index, buf, nbytes)
        if index == 1:  # corrupted after sealing: in flight, as the engine sees it
            buf[3] ^= 0x10

    monkeypatch.setattr(integrity, "seal", seal_then_flip_a_bit)
    plan, port = make_plan(), free_port()
    procs, outs = _spawn_engines(tmp_path, [[port]], 2, plan, [2])
    group = BroadcastGroup.create("127.0.0.1", port, 0, 2, timeout_s=JOIN_S, group_name=f"w{port}")
    try:  # the engine stops receiving at bucket 1: the sender may fail, but must not hang
        send_buckets(group, plan, make_tensors(2), verify=True, timeout_s=5)
    except TransportError:
        pass
    finally:
        group.destroy()
    join_all(procs)
    report = _results(outs)[0]
    assert report["error"] == IntegrityError.__name__ and report["bucket"] == 1


def _dying_sender(port: int, plan_frame: bytes, kill_bucket: int) -> None:
    plan = codec.decode(plan_frame).plan
    group = BroadcastGroup.create("127.0.0.1", port, 0, 2, timeout_s=JOIN_S)
    tensors = make_tensors(2)
    if kill_bucket >= 0:
        tensors = KillAt(tensors, victim_in_bucket(plan, kill_bucket))
    send_buckets(group, plan, tensors, verify=True, timeout_s=30)
    group.destroy()


def test_killed_sender_raises_then_a_fresh_group_works(tmp_path: Path) -> None:
    plan = make_plan()
    port = free_port()
    sender = start(_dying_sender, port, _plan_frame(plan), 3)
    group = BroadcastGroup.create("127.0.0.1", port, 1, 2, timeout_s=JOIN_S)
    got: dict[str, torch.Tensor] = {}
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="broadcast group"):
        recv_buckets(group, plan, collector(got), verify=True, timeout_s=5)
    assert time.monotonic() - t0 < 5 + 3
    group.destroy()
    join_all([sender])
    assert sender.exitcode == -signal.SIGKILL
    assert len(got) >= sum(len(b.tensors) for b in plan.buckets[:2])

    port = free_port()  # same process, new group on a new port
    sender = start(_dying_sender, port, _plan_frame(plan), -1)
    group = BroadcastGroup.create("127.0.0.1", port, 1, 2, timeout_s=JOIN_S)
    try:
        got = {}
        stats = recv_buckets(group, plan, collector(got), verify=True, timeout_s=30)
    finally:
        group.destroy()
    join_all([sender])
    assert mismatches(got, make_tensors(2)) == [] and sender.exitcode == 0
    assert {"wait", "verify", "load"} <= set(stats.phases)


def test_rendezvous_with_a_missing_peer_times_out() -> None:
    for rank in (0, 1):  # trainer waiting for an engine; engine with no trainer
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout, match=f"rank {rank}/2: rendezvous"):
            BroadcastGroup.create("127.0.0.1", free_port(), rank, 2, timeout_s=1.5)
        assert time.monotonic() - t0 < 1.5 + 6


def test_roles_are_checked() -> None:
    with pytest.raises(ValueError):
        BroadcastGroup.create("127.0.0.1", free_port(), 2, 2)
    with pytest.raises(ValueError, match="backend"):
        BroadcastGroup.create("127.0.0.1", free_port(), 0, 2, backend="mpi")  # type: ignore[arg-type]
