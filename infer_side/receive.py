"""How an engine validates and receives one weight update, per transport.

`validate` runs on the loop thread before anything is accepted; `receive` runs on the update's
worker thread and writes only into the target store it is given (the shadow copy, or the live
weights while the engine refuses to generate). The bytes themselves move through
`rlsync.transports`; this module only maps buckets and files onto the engine's weights.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from infer_side.update_job import UpdateJob
from infer_side.weights import ModelWeights
from rlsync.buckets import bucket_views, tensor_nbytes, validate_plan
from rlsync.checkpoint_io import checkpoint_specs
from rlsync.protocol import (
    Bucket,
    InitWeightsGroup,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC,
)
from rlsync.transports import disk
from rlsync.transports.broadcast import BroadcastGroup, recv_buckets
from rlsync.transports.control import SHM_DIR
from rlsync.transports.ipc import open_receiver
from rlsync.transports.shm import IpcReceiver

STALE_CHECK_S = 1.0


class Join:
    """One broadcast-group rendezvous running on its own thread."""

    def __init__(self, msg: InitWeightsGroup):
        self.msg, self.group, self.error = msg, None, ""
        self.thread = threading.Thread(target=self._run, name=f"join-{msg.group_name}", daemon=True)

    def _run(self) -> None:
        msg = self.msg
        try:
            self.group = BroadcastGroup.create(
                master_address=msg.master_address, master_port=msg.master_port,
                rank=msg.rank_offset, world_size=msg.world_size, backend=msg.backend,
                timeout_s=msg.timeout_s, group_name=msg.group_name)
        except Exception as exc:  # reported in the Result; the engine loop goes on
            self.error = f"{type(exc).__name__}: {exc}"


class Links:
    """The engine's transport endpoints that outlive one update: broadcast groups by name and
    IPC receivers by buffer name (opened once, reused for every push)."""

    def __init__(self) -> None:
        self.groups: dict[str, BroadcastGroup] = {}
        self.joins: dict[str, Join] = {}
        self.ipc: dict[str, IpcReceiver] = {}
        self.next_check = 0.0

    def start_join(self, msg: InitWeightsGroup) -> None:
        """Join a broadcast group on a worker thread: the rendezvous waits for rank 0 (up to
        msg.timeout_s) while the engine loop keeps answering; `finished_joins` reports it."""
        if msg.group_name in self.groups or msg.group_name in self.joins:
            raise ValueError(f"group {msg.group_name!r} already exists; destroy it first")
        join = self.joins[msg.group_name] = Join(msg)
        join.thread.start()

    def join_done(self) -> bool:
        return any(not j.thread.is_alive() for j in self.joins.values())

    def finished_joins(self) -> list[tuple[InitWeightsGroup, bool, str]]:
        """(request, success, message) of every join that ended; joined groups become usable."""
        done = []
        for name, join in list(self.joins.items()):
            if join.thread.is_alive():
                continue
            del self.joins[name]
            if join.group is not None:
                self.groups[name] = join.group
                done.append((join.msg, True, f"joined group {name} as rank {join.msg.rank_offset}"))
            else:
                done.append((join.msg, False, f"InitWeightsGroup: {join.error}"))
        return done

    def destroy_group(self, name: str) -> bool:
        group = self.groups.pop(name, None)
        if group is not None:
            group.destroy()
        return group is not None

    def receiver(self, msg: UpdateWeightsFromIPC) -> IpcReceiver:
        """The IPC receiver of this buffer kind: mapped on first use, re-mapped only when a
        push names another buffer (nothing is re-opened per push)."""
        current = self.ipc.get(msg.buffer.kind)
        if current is None:
            current = self.ipc[msg.buffer.kind] = open_receiver(msg.buffer)
        else:
            current.attach(msg.buffer)
        return current

    def release_stale(self) -> None:
        """Unmap IPC buffers whose sender is gone (it unlinked the control segment on close),
        so a closed pusher's buffer does not stay resident in this engine until the next push.
        Called from the loop at most once per STALE_CHECK_S."""
        self.next_check = time.monotonic() + STALE_CHECK_S
        for kind, receiver in list(self.ipc.items()):
            name = receiver.buffer.control_name if receiver.buffer is not None else ""
            if not os.path.exists(os.path.join(SHM_DIR, name)):
                receiver.close()
                del self.ipc[kind]

    def check_due(self) -> bool:
        return bool(self.ipc) and time.monotonic() >= self.next_check

    def close(self) -> None:
        for name in list(self.groups):
            self.destroy_group(name)
        for receiver in self.ipc.values():
            receiver.close()
        self.ipc.clear()


def validate(msg: Any, weights: ModelWeights, links: Links) -> tuple[str, int]:
    """Check the update names exactly this model's tensors, shapes and dtypes; return its
    transport kind and byte count. Raises with the offending tensor or field named."""
    if isinstance(msg, UpdateWeightsFromDisk):
        specs = checkpoint_specs(msg.path)
        weights.validate(specs, complete=True)
        return "disk", sum(tensor_nbytes(d, s) for _, d, s in specs)
    if isinstance(msg, UpdateWeightsFromDistributed) and msg.group_name not in links.groups:
        raise ValueError(f"group_name {msg.group_name!r}: no such weights group (InitWeightsGroup first)")
    if isinstance(msg, UpdateWeightsFromIPC) and msg.buffer.kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("buffer.kind 'cuda' but this engine has no CUDA device")
    total = validate_plan(msg.plan)
    weights.validate([(s.name, s.dtype, s.shape) for b in msg.plan.buckets for s in b.tensors])
    kind = "broadcast" if isinstance(msg, UpdateWeightsFromDistributed) else "ipc"
    return kind, total


def receive(job: UpdateJob, target: ModelWeights, links: Links) -> None:
    """Receive the whole update into `target` (worker thread). Raises on any failure."""
    msg = job.msg
    with torch.inference_mode():
        if isinstance(msg, UpdateWeightsFromDisk):
            _receive_disk(job, target)
            return
        on_bucket = _bucket_loader(job, target)
        start = time.perf_counter()
        if isinstance(msg, UpdateWeightsFromDistributed):
            recv_buckets(links.groups[msg.group_name], msg.plan, on_bucket,
                         verify=msg.verify, timeout_s=msg.timeout_s)
        else:
            links.receiver(msg).receive(msg.plan, msg.push_id, on_bucket,
                                        verify=msg.verify, timeout_s=msg.timeout_s)
        job.timings["recv_s"] = time.perf_counter() - start - job.timings["load_s"]


def _bucket_loader(job: UpdateJob, target: ModelWeights) -> Any:
    """on_bucket callback: copy each view of a received bucket into the target's weights."""
    views = target.hf_views()
    job.timings["buckets_loaded"] = 0

    def on_bucket(index: int, bucket: Bucket, buf: torch.Tensor) -> None:
        start = time.perf_counter()
        for name, view in bucket_views(bucket, buf):
            views[name].copy_(view)
        job.timings["buckets_loaded"] += 1
        job.timings["load_s"] += time.perf_counter() - start

    return on_bucket


def _receive_disk(job: UpdateJob, target: ModelWeights) -> None:
    start = time.perf_counter()
    views = target.hf_views()
    job.timings["buckets_loaded"] = 0
    for name, tensor in disk.read_weights(Path(job.msg.path), verify=job.msg.verify):
        views[name].copy_(tensor)
        job.timings["buckets_loaded"] += 1
    job.timings["load_s"] = time.perf_counter() - start
