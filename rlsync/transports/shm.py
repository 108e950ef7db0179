"""The POSIX shared-memory buffer kind of the IPC transport (CPU): the protocol of
`ipc` over a named /dev/shm segment, created and pre-faulted once by the sender.
"""

from __future__ import annotations

import torch

from rlsync.transports.control import Control, Segment, geometry, new_segment_name
from rlsync.transports.ipc import BucketWriter, IpcSender
from rlsync.transports.ipc_reader import IpcReceiver
from rlsync.wire.protocol import BucketPlan, IpcBuffer


class ShmSender(IpcSender):
    """`IpcSender` over a named shm data segment, created and pre-faulted once.

    Sized for every bucket of `plan` and/or `capacity_bytes`; `num_engines` fixes the number
    of engine lines in the control segment.
    """

    def __init__(
        self,
        plan: BucketPlan | None = None,
        *,
        num_engines: int,
        capacity_bytes: int | None = None,
        writer: BucketWriter | None = None,
    ):
        if not 1 <= num_engines <= 4096:
            raise ValueError(f"num_engines must be in [1, 4096], got {num_engines}")
        nbytes = geometry(plan, capacity_bytes)
        self.segment = Segment(new_segment_name("data"), nbytes, create=True)
        try:
            control = Control.create(num_engines)
        except BaseException:
            self.segment.close()
            raise
        super().__init__(self.segment.tensor(), control, writer)

    @property
    def data_name(self) -> str:
        return self.segment.name

    def _close_data(self) -> None:
        self.segment.close()


class ShmReceiver(IpcReceiver):
    """`IpcReceiver` for kind "shm": maps the sender's data segment."""

    segment: Segment | None = None

    def _open_data(self, buffer: IpcBuffer) -> torch.Tensor:
        self.segment = Segment(buffer.name, buffer.nbytes)
        return self.segment.tensor()

    def _close_data(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
