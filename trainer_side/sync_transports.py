"""The trainer side of each transport: what to announce to the engines and how to move bytes.

One push, for every transport: prepare (disk: write the files) -> announce UpdateWeights* to
every live engine -> gather "accepted" -> transfer the bytes to the engines that accepted ->
gather "done". The transports differ only in the message they announce and in `transfer`.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from rlsync.buckets import dtype_from_name
from rlsync.config import SyncConfig
from rlsync.protocol import (
    BucketPlan,
    DestroyWeightsGroup,
    InitWeightsGroup,
    Message,
    UpdateWeightsFromDisk,
    UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC,
)
from rlsync.transports import disk
from rlsync.transports.broadcast import BroadcastGroup, free_port, send_buckets
from rlsync.transports.control import remove_orphan_segments
from rlsync.transports.ipc import make_sender
from trainer_side.push_report import PushError, PushReport
from trainer_side.sync_engines import EngineSet

Tensors = dict[str, torch.Tensor]


class Transport:
    """Announce/transfer/gather, shared by every transport."""

    kind = ""
    can_rebuild = False

    def __init__(self, cfg: SyncConfig, engines: EngineSet, work_dir: Path, device: torch.device):
        self.cfg, self.engines, self.work_dir, self.device = cfg, engines, work_dir, device

    def push(self, plan: BucketPlan, tensors: Tensors, version: int) -> PushReport:
        report = PushReport(version, self.kind)
        names = self.engines.live()
        self.prepare(plan, tensors, version)
        rids = self.engines.send({n: self.message(n, plan, version) for n in names})
        accepted = []
        for name, result in self.engines.gather(rids, self.cfg.timeout_s).items():
            if result.success:
                accepted.append(name)
            else:
                report.record(name, False, result.message)
        if accepted:
            self._transfer(report, plan, tensors, accepted)
            done = self.engines.gather({n: rids[n] for n in accepted}, 2 * self.cfg.timeout_s)
            for name, result in done.items():
                report.record(name, result.success, result.message, result.payload)
        for name in self.engines.dead:
            report.record(name, False, "engine is dead")
        return report

    def _transfer(self, report: PushReport, plan: BucketPlan, tensors: Tensors,
                  accepted: list[str]) -> None:
        start = time.perf_counter()
        try:
            self.transfer(plan, tensors, accepted)
        except Exception as exc:  # the engines report their side; keep the sender's reason too
            report.transfer_error = f"{type(exc).__name__}: {exc}"
        report.transfer_s = time.perf_counter() - start

    def common(self, version: int) -> dict[str, Any]:
        c = self.cfg
        return dict(weight_version=version, flush_cache=c.flush_cache, torch_empty_cache=c.torch_empty_cache,
                    load_mode=c.load_mode, pause_mode=c.pause_mode, timeout_s=c.timeout_s, verify=c.verify)

    def prepare(self, plan: BucketPlan, tensors: Tensors, version: int) -> None:
        """Work before the announcement (the disk transport writes its files here)."""

    def message(self, name: str, plan: BucketPlan, version: int) -> Message:
        raise NotImplementedError

    def transfer(self, plan: BucketPlan, tensors: Tensors, accepted: list[str]) -> None:
        raise NotImplementedError

    def rebuild(self) -> None:
        """Re-form the transport around the live engines (broadcast only)."""

    def close(self) -> None:
        """Release buffers, groups and files this transport holds."""


class BroadcastTransport(Transport):
    """A dedicated process group: trainer rank 0, engines 1..N; metadata over ZMQ."""

    kind = "broadcast"
    can_rebuild = True

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.group: BroadcastGroup | None = None
        self.group_name = ""
        self.members: list[str] = []
        self._form(self.engines.live())

    def _form(self, names: list[str]) -> None:
        """Rendezvous: every engine joins from its loop while rank 0 joins here; all bounded."""
        backend = self.cfg.backend if self.cfg.backend != "auto" else (
            "nccl" if self.device.type == "cuda" else "gloo")
        port, world = free_port(self.cfg.master_address), len(names) + 1
        self.group_name = f"weights-{uuid.uuid4().hex[:8]}"
        rids = self.engines.send({n: InitWeightsGroup(
            master_address=self.cfg.master_address, master_port=port, rank_offset=i + 1,
            world_size=world, group_name=self.group_name, backend=backend,
            timeout_s=self.cfg.timeout_s) for i, n in enumerate(names)})
        self.group = BroadcastGroup.create(
            master_address=self.cfg.master_address, master_port=port, rank=0, world_size=world,
            backend=backend, timeout_s=self.cfg.timeout_s, group_name=self.group_name)
        failed = {n: r.message for n, r in self.engines.gather(rids, self.cfg.timeout_s).items() if not r.success}
        if failed:
            raise PushError(f"weights group rendezvous failed: {failed}")
        self.members = names

    def message(self, name: str, plan: BucketPlan, version: int) -> Message:
        return UpdateWeightsFromDistributed(group_name=self.group_name, plan=plan, **self.common(version))

    def transfer(self, plan: BucketPlan, tensors: Tensors, accepted: list[str]) -> None:
        if sorted(accepted) != sorted(self.members):
            refused = sorted(set(self.members) - set(accepted))
            raise PushError(f"engines {refused} refused the update; a broadcast needs every member")
        assert self.group is not None
        send_buckets(self.group, plan, tensors, verify=self.cfg.verify, timeout_s=self.cfg.timeout_s)

    def rebuild(self) -> None:
        self._dissolve()
        self._form(self.engines.live())

    def _dissolve(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
        live = [n for n in self.members if n not in self.engines.dead]
        rids = self.engines.send({n: DestroyWeightsGroup(group_name=self.group_name) for n in live})
        self.engines.gather(rids, min(self.cfg.timeout_s, 10.0))

    def close(self) -> None:
        self._dissolve()


class IpcTransport(Transport):
    """One persistent buffer (shared memory on CPU, CUDA IPC on GPU) that every engine reads."""

    kind = "ipc"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.sender: Any = None
        self.push_id = 0
        remove_orphan_segments()  # what a SIGKILLed pusher left in /dev/shm

    def prepare(self, plan: BucketPlan, tensors: Tensors, version: int) -> None:
        if self.sender is None or not self.sender.fits(plan):
            if self.sender is not None:
                self.sender.close()
            self.sender = make_sender(plan, num_engines=len(self.engines.names), device=self.device)
        self.push_id += 1

    def message(self, name: str, plan: BucketPlan, version: int) -> Message:
        return UpdateWeightsFromIPC(buffer=self.sender.descriptor(self.engines.index(name)),
                                    plan=plan, push_id=self.push_id, **self.common(version))

    def transfer(self, plan: BucketPlan, tensors: Tensors, accepted: list[str]) -> None:
        readers = [self.engines.index(n) for n in accepted]
        self.sender.push(plan, tensors, self.push_id, readers=readers,
                         verify=self.cfg.verify, timeout_s=self.cfg.timeout_s)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


class DiskTransport(Transport):
    """Safetensors files in a directory; the engines read them after the announcement."""

    kind = "disk"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.root = Path(self.cfg.disk_dir) if self.cfg.disk_dir else self.work_dir / "weights"
        self.current: Path | None = None

    def prepare(self, plan: BucketPlan, tensors: Tensors, version: int) -> None:
        dtypes = {s.name: dtype_from_name(s.dtype) for b in plan.buckets for s in b.tensors}
        path = self.root / f"v{version}"
        disk.write_weights(path, {n: t.to(dtypes[n]) for n, t in tensors.items()}, version,
                           cfg=self.engines.model_cfg, fingerprints=self.cfg.verify)
        if self.current is not None and self.current != path:
            shutil.rmtree(self.current, ignore_errors=True)
        self.current = path

    def message(self, name: str, plan: BucketPlan, version: int) -> Message:
        assert self.current is not None
        return UpdateWeightsFromDisk(path=str(self.current), **self.common(version))

    def transfer(self, plan: BucketPlan, tensors: Tensors, accepted: list[str]) -> None:
        """The files were written in prepare; each engine reads them itself."""


TRANSPORTS = {"broadcast": BroadcastTransport, "ipc": IpcTransport, "disk": DiskTransport}


def make_transport(cfg: SyncConfig, engines: EngineSet, work_dir: Path, device: torch.device) -> Transport:
    return TRANSPORTS[cfg.transport](cfg, engines, work_dir, device)
