"""CUDA IPC transport: the `ipc` protocol over a persistent CUDA buffer on the trainer's
GPU, shared once through a CUDA IPC handle.

The handle is written into `IpcBuffer` field by field (never pickled), from what
`UntypedStorage._share_cuda_` returns; the GPU is named by its UUID so an engine with a
different CUDA_VISIBLE_DEVICES finds its own index for it. Control counters live in the same
POSIX shm control segment as `shm`'s. Each engine opens the buffer once
(`_new_shared_cuda`) and keeps it until `close()`, so device memory stays flat however many
pushes run; closing drops the mapping and returns the sender's IPC reference count.

Ordering: the sender synchronizes its stream after packing a bucket before publishing it;
an engine synchronizes its stream after `on_bucket` before marking the bucket consumed.
This module imports cleanly on a CPU-only torch; it needs CUDA only when used.
"""

from __future__ import annotations

import os
import secrets

import torch

from rlsync.transports import TransportError
from rlsync.transports.control import Control, geometry
from rlsync.transports.ipc import BucketWriter, IpcSender
from rlsync.transports.ipc_reader import IpcReceiver
from rlsync.wire.protocol import BucketPlan, CudaShare, IpcBuffer

_SHARE_FIELDS = (
    "device",
    "handle",
    "size",
    "storage_offset",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)
"""The tuple `_share_cuda_` returns, named; `device` and `size` are carried elsewhere."""


def share(data: torch.Tensor) -> CudaShare:
    """Export `data`'s whole CUDA storage. Each call adds one IPC reference that the opener's
    storage returns when it is freed, so call it once per opener and cache the result."""
    torch.cuda.current_stream(data.device).synchronize()
    fields = dict(zip(_SHARE_FIELDS, data.untyped_storage()._share_cuda_(), strict=True))
    if fields["handle"] is None or fields["size"] != data.untyped_storage().nbytes():
        raise TransportError(f"cuda ipc: cannot share {fields['size']} bytes of storage")
    assert data.device.index is not None
    return CudaShare(
        gpu_uuid=gpu_uuid(data.device.index),
        **{k: v for k, v in fields.items() if k not in ("device", "size")},
    )


def open_shared(shared: CudaShare | None, nbytes: int, what: str) -> torch.Tensor:
    """Map CUDA memory another process exported, as a 1-D uint8 tensor of `nbytes` on this
    process's index of the same GPU; dropping the tensor closes the mapping."""
    if shared is None or not shared.handle or not shared.ref_counter_handle:
        raise TransportError(f"cuda ipc {what}: missing handle fields")
    index = device_index_for(shared.gpu_uuid)
    torch.cuda.init()
    storage = torch.UntypedStorage._new_shared_cuda(
        index,
        shared.handle,
        nbytes,
        shared.storage_offset,
        shared.ref_counter_handle,
        shared.ref_counter_offset,
        shared.event_handle,
        shared.event_sync_required,
    )
    data = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    return data.set_(storage, 0, (nbytes,), (1,))


def gpu_uuid(index: int) -> str:
    """The UUID of visible GPU `index`, as a string both sides compare."""
    return str(torch.cuda.get_device_properties(index).uuid)


def device_index_for(uuid: str) -> int:
    """This process's index for the GPU with `uuid` (raises if it is not visible here)."""
    if not torch.cuda.is_available():
        raise TransportError(f"cuda ipc: GPU {uuid} requested but CUDA is not available here")
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(index) == uuid:
            return index
    raise TransportError(
        f"cuda ipc: GPU {uuid} is not visible to this process "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    )


class CudaIpcSender(IpcSender):
    """`IpcSender` over one persistent CUDA buffer on `device` (default: the current GPU)."""

    kind = "cuda"

    def __init__(
        self,
        plan: BucketPlan | None = None,
        *,
        num_engines: int,
        device: torch.device | str | int | None = None,
        capacity_bytes: int | None = None,
        writer: BucketWriter | None = None,
    ):
        if not 1 <= num_engines <= 4096:
            raise ValueError(f"num_engines must be in [1, 4096], got {num_engines}")
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if device is None
            else torch.device(device)
        )
        if dev.type != "cuda" or dev.index is None:
            raise ValueError(f"CudaIpcSender needs a CUDA device with an index, got {dev}")
        nbytes = geometry(plan, capacity_bytes)
        # Zeroed so stale allocator contents never reach an engine.
        data = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        super().__init__(data, Control.create(num_engines), writer)
        self._name = f"cuda-{os.getpid()}-{secrets.token_hex(6)}"
        self._shared: dict[int, CudaShare] = {}

    @property
    def data_name(self) -> str:
        return self._name

    def _descriptor_fields(self, engine_index: int) -> dict:
        # Cached per engine, so re-sending a descriptor adds no IPC reference.
        if engine_index not in self._shared:
            self._shared[engine_index] = share(self.data)
        return {"cuda": self._shared[engine_index]}

    def _close_data(self) -> None:
        # `close()` dropped our tensor; while an engine still holds the buffer, torch keeps
        # the block aside and ipc_collect frees it once every engine has released it.
        self._shared.clear()
        torch.cuda.ipc_collect()


class CudaIpcReceiver(IpcReceiver):
    """`IpcReceiver` for kind "cuda": opens the sender's buffer once on the same GPU."""

    kind = "cuda"

    def _open_data(self, buffer: IpcBuffer) -> torch.Tensor:
        return open_shared(buffer.cuda, buffer.nbytes, f"buffer {buffer.name!r}")

    def _close_data(self) -> None:
        # `close()` already dropped the only tensor on the storage; its deleter synchronizes,
        # closes the IPC mapping and decrements the sender's reference count.
        pass
