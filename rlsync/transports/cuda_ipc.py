"""CUDA IPC transport: the `shm` slot protocol over a persistent CUDA buffer on the trainer's
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

from rlsync.protocol import BucketPlan, IpcBuffer
from rlsync.transports import TransportError
from rlsync.transports.control import Control, geometry
from rlsync.transports.ipc import IpcReceiver, IpcSender

_SHARE_FIELDS = (
    "device",
    "cuda_handle",
    "size",
    "cuda_storage_offset",
    "cuda_ref_counter_handle",
    "cuda_ref_counter_offset",
    "cuda_event_handle",
    "cuda_event_sync_required",
)
"""The tuple `_share_cuda_` returns, named; `device` and `size` are carried elsewhere."""


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
        num_slots: int | None = None,
        capacity_bytes: int | None = None,
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
        slots, slot_bytes, nbytes = geometry(plan, num_slots, capacity_bytes)
        # Zeroed so stale allocator contents never reach an engine.
        data = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        super().__init__(data, Control.create(num_engines, slots, slot_bytes), slots, slot_bytes)
        self.uuid = gpu_uuid(dev.index)
        self._name = f"cuda-{os.getpid()}-{secrets.token_hex(6)}"
        self._shared: dict[int, dict] = {}

    @property
    def data_name(self) -> str:
        return self._name

    def _descriptor_fields(self, engine_index: int) -> dict:
        # One _share_cuda_ per engine: each call adds one IPC reference that the engine's
        # storage returns when it is freed. Cached, so re-sending a descriptor adds none.
        if engine_index not in self._shared:
            torch.cuda.current_stream(self.data.device).synchronize()
            shared = dict(
                zip(_SHARE_FIELDS, self.data.untyped_storage()._share_cuda_(), strict=True)
            )
            if shared["cuda_handle"] is None or shared["size"] != self.data.numel():
                raise TransportError(
                    f"cuda ipc: cannot share the buffer ({shared['size']} "
                    f"of {self.data.numel()} bytes)"
                )
            self._shared[engine_index] = {
                k: v for k, v in shared.items() if k not in ("device", "size")
            }
        return {"gpu_uuid": self.uuid, **self._shared[engine_index]}

    def _close_data(self) -> None:
        # `close()` dropped our tensor; while an engine still holds the buffer, torch keeps
        # the block aside and ipc_collect frees it once every engine has released it.
        self._shared.clear()
        torch.cuda.ipc_collect()


class CudaIpcReceiver(IpcReceiver):
    """`IpcReceiver` for kind "cuda": opens the sender's buffer once on the same GPU."""

    kind = "cuda"

    def _open_data(self, buffer: IpcBuffer) -> torch.Tensor:
        if not buffer.cuda_handle or not buffer.cuda_ref_counter_handle:
            raise TransportError(f"cuda ipc buffer {buffer.name!r}: missing handle fields")
        index = device_index_for(buffer.gpu_uuid)
        torch.cuda.init()
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            buffer.cuda_handle,
            buffer.nbytes,
            buffer.cuda_storage_offset,
            buffer.cuda_ref_counter_handle,
            buffer.cuda_ref_counter_offset,
            buffer.cuda_event_handle,
            buffer.cuda_event_sync_required,
        )
        data = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
        return data.set_(storage, 0, (buffer.nbytes,), (1,))

    def _close_data(self) -> None:
        # `close()` already dropped the only tensor on the storage; its deleter synchronizes,
        # closes the IPC mapping and decrements the sender's reference count.
        pass
