"""Pick the IPC transport for a device or a descriptor: POSIX shared memory for CPU
weights, CUDA IPC for weights on a GPU. Both run the protocol in `shm`; callers hold an
`IpcSender` / `IpcReceiver` and never branch on the kind themselves.
"""

from __future__ import annotations

import torch

from rlsync.protocol import BucketPlan, IpcBuffer
from rlsync.transports import TransportError
from rlsync.transports.shm import IpcReceiver, IpcSender, ShmReceiver, ShmSender


def make_sender(plan: BucketPlan | None = None, *, num_engines: int,
                device: torch.device | str | None = None, num_slots: int | None = None,
                capacity_bytes: int | None = None) -> IpcSender:
    """A CUDA IPC sender when `device` is a GPU, else a shared-memory one."""
    if device is not None and torch.device(device).type == "cuda":
        from rlsync.transports.cuda_ipc import CudaIpcSender

        return CudaIpcSender(plan, num_engines=num_engines, device=device, num_slots=num_slots,
                             capacity_bytes=capacity_bytes)
    return ShmSender(plan, num_engines=num_engines, num_slots=num_slots,
                     capacity_bytes=capacity_bytes)


def open_receiver(buffer: IpcBuffer) -> IpcReceiver:
    """A receiver of the descriptor's kind, attached to it."""
    if buffer.kind == "shm":
        return ShmReceiver(buffer)
    if buffer.kind == "cuda":
        from rlsync.transports.cuda_ipc import CudaIpcReceiver

        return CudaIpcReceiver(buffer)
    raise TransportError(f"ipc: unknown buffer kind {buffer.kind!r}")
