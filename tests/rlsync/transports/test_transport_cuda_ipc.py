"""CUDA IPC transport: a trainer-side CUDA buffer read by an engine process through CUDA IPC.

The GPU tests need a CUDA device (`-m gpu`); the first test runs everywhere and checks the
module imports and refuses cleanly on a CPU-only torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsync.plan.buckets import bucket_views, fingerprint
from rlsync.transports import TransportError
from rlsync.transports.cuda_ipc import CudaIpcReceiver, CudaIpcSender, device_index_for
from rlsync.transports.ipc import make_sender, open_receiver
from rlsync.transports.shm import ShmReceiver, ShmSender
from rlsync.wire import codec
from rlsync.wire.protocol import UpdateWeightsFromIPC
from tests.rlsync.transports.test_transport_shm import (
    join_all,
    make_plan,
    make_tensors,
    mismatches,
    start,
    wait_for_file,
    write_json,
)

PUSHES = 100
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_factories_pick_the_kind_and_cuda_refuses_cleanly() -> None:
    plan = make_plan()
    sender = make_sender(plan, num_engines=1, device="cpu")
    try:
        assert isinstance(sender, ShmSender)
        receiver = open_receiver(sender.descriptor(0))
        assert isinstance(receiver, ShmReceiver)
        receiver.close()
        with pytest.raises(TransportError, match="cannot open a 'shm' buffer"):
            CudaIpcReceiver(sender.descriptor(0))
    finally:
        sender.close()
    if not torch.cuda.is_available():
        with pytest.raises(TransportError, match="CUDA is not available"):
            device_index_for("GPU-00000000-0000-0000-0000-000000000000")


def _cuda_engine(frame: bytes, visible: str, out: str) -> None:
    """Engine process: map the buffer once, load PUSHES pushes into preallocated weights."""
    if visible:  # before CUDA initializes in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    msg = codec.decode(frame)
    receiver = open_receiver(msg.buffer)
    data = receiver.data
    weights = {n: torch.empty_like(t, device="cuda") for n, t in make_tensors(0).items()}

    def on_bucket(index: int, bucket: Any, buf: torch.Tensor) -> None:
        for name, view in bucket_views(bucket, buf):
            weights[name].copy_(view)

    report: dict[str, Any] = {"bad": [], "remapped": False}
    for push_id in range(1, PUSHES + 1):
        receiver.attach(msg.buffer)  # what an engine does per UpdateWeightsFromIPC
        report["remapped"] |= receiver.data is not data
        receiver.receive(msg.plan, push_id, on_bucket, verify=_verify(push_id), timeout_s=30)
        if push_id in (1, PUSHES):
            torch.cuda.synchronize()
            got = {n: t.cpu() for n, t in weights.items()}
            report["bad"] += mismatches(got, make_tensors(push_id))
            report[f"free_after_{push_id}"] = torch.cuda.mem_get_info()[0]
    del data
    receiver.close()
    write_json(out, report)


def _verify(push_id: int) -> bool:
    return push_id % 10 == 1  # on the first push too, so fingerprint caches exist from then


def _visible_as(uuid: str) -> str:
    """CUDA_VISIBLE_DEVICES naming only this GPU, when there is more than one to tell apart."""
    if torch.cuda.device_count() < 2:
        return ""
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_ipc_push_is_bit_exact_and_memory_stays_flat(tmp_path: Path) -> None:
    # With two GPUs the engine sees the sender's GPU as its index 0: found by UUID.
    index = torch.cuda.device_count() - 1
    device = torch.device("cuda", index)
    plan = make_plan()
    fingerprint(torch.zeros(8, dtype=torch.uint8, device=device))  # its cache is process-wide
    baseline = torch.cuda.memory_allocated(device)
    sender = CudaIpcSender(plan, num_engines=1, device=device)
    desc = sender.descriptor(0)
    assert desc.kind == "cuda" and len(desc.cuda.handle) > 0 and desc.cuda.gpu_uuid
    assert device_index_for(desc.cuda.gpu_uuid) == index
    out = tmp_path / "engine.json"
    frame = codec.encode(UpdateWeightsFromIPC(buffer=desc, plan=plan, push_id=1))
    proc = start(_cuda_engine, frame, _visible_as(desc.cuda.gpu_uuid), str(out))
    try:
        held = None
        for push_id in range(1, PUSHES + 1):
            tensors = {n: t.to(device) for n, t in make_tensors(push_id).items()}
            stats = sender.push(plan, tensors, push_id, verify=_verify(push_id), timeout_s=60)
            assert stats.timed_out_engines == []
            del tensors
            held = held or torch.cuda.memory_allocated(device)
            assert torch.cuda.memory_allocated(device) == held  # nothing re-shared per push
        wait_for_file(out, 120, proc)
        join_all([proc])
    finally:
        sender.close()
    report = json.loads(out.read_text())
    assert report["bad"] == [] and report["remapped"] is False
    assert abs(report[f"free_after_{PUSHES}"] - report["free_after_1"]) < (4 << 20)
    torch.cuda.synchronize(device)
    assert torch.cuda.memory_allocated(device) == baseline  # the buffer is gone once released
