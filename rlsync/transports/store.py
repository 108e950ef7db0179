"""Engine-owned weight stores that a pusher can write directly (the one-copy path).

An engine lays each of its weight stores (live, shadow) out in one flat byte buffer it
owns. Exposed, that buffer is a POSIX shm segment the engine created and locks (CPU) or
engine GPU memory exported by CUDA IPC handle; the engine publishes its layout and names
the target store of each update (`StoreRef`), and the pusher maps the store once and
copies every trainer tensor straight into its bytes. The engine owns the memory, so a
trainer that dies never takes the engine's weights with it; the pusher's mapping only
keeps unlinked pages alive until it closes.
"""

from __future__ import annotations

import secrets
import weakref

import torch

from rlsync.protocol import StoreRef
from rlsync.transports import TransportError
from rlsync.transports.control import Segment, new_segment_name


class EngineStore:
    """One flat uint8 buffer of `nbytes` on `device`, zeroed; with `exposed`, in memory
    another process can map (`ref` says where), else ordinary private memory."""

    def __init__(self, nbytes: int, device: torch.device | str = "cpu", *, exposed: bool = False):
        device = torch.device(device)
        self.segment: Segment | None = None
        self.ref: StoreRef | None = None
        with torch.inference_mode(False):
            if exposed and device.type == "cpu":
                self.segment = Segment(new_segment_name("store"), max(nbytes, 1), create=True)
                self.flat = self.segment.tensor()[:nbytes]
                # a store dropped without close() still gives its name back
                weakref.finalize(self, self.segment.close)
                self.ref = StoreRef(kind="shm", name=self.segment.name, nbytes=nbytes)
            else:
                self.flat = torch.zeros(nbytes, dtype=torch.uint8, device=device)
                if exposed:
                    self.ref = _cuda_ref(self.flat)

    def close(self) -> None:
        """Unlink the segment's name (pages stay while any view or peer mapping is alive)."""
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def _cuda_ref(flat: torch.Tensor) -> StoreRef:
    from rlsync.transports.cuda_ipc import share

    name = f"cuda-store-{secrets.token_hex(8)}"  # an address is reused by a later store
    return StoreRef(kind="cuda", name=name, nbytes=flat.numel(), cuda=share(flat))


class MappedStore:
    """The pusher's mapping of one engine store, opened once and kept across pushes."""

    def __init__(self, ref: StoreRef):
        self.ref = ref
        self.segment: Segment | None = None
        if ref.kind == "shm":
            self.segment = Segment(ref.name)
            if self.segment.nbytes < ref.nbytes:
                self.segment.close()
                raise TransportError(
                    f"store {ref.name}: segment holds {self.segment.nbytes} bytes, "
                    f"the engine says {ref.nbytes}"
                )
            self.flat = self.segment.tensor()[: ref.nbytes]
        elif ref.kind == "cuda":
            from rlsync.transports.cuda_ipc import open_shared

            self.flat = open_shared(ref.cuda, ref.nbytes, f"store {ref.name!r}")
        else:
            raise TransportError(f"store {ref.name!r}: unknown kind {ref.kind!r}")

    def close(self) -> None:
        self.flat = torch.empty(0, dtype=torch.uint8)
        if self.segment is not None:
            self.segment.close()
            self.segment = None
