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

from rlsync.transports import TransportError
from rlsync.transports.control import Segment, new_segment_name
from rlsync.wire.protocol import StoreRef


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


class MappedStores:
    """The engine stores one writer (the pusher, or a sharded trainer's rank) maps, each on
    first use and kept across pushes. An engine writes into two stores in turn (live,
    shadow): one not written for two pushes was dropped or replaced by its engine, and is
    unmapped (`unmap_stale`) so its pages can go."""

    def __init__(self) -> None:
        self.maps: dict[tuple, tuple[MappedStore, int]] = {}
        """(kind, name, nbytes) -> (mapping, the push it was last written in)."""
        self.push = 0

    def next_push(self) -> None:
        self.push += 1

    def flat(self, ref: StoreRef) -> torch.Tensor:
        """The store `ref` names, as one flat uint8 tensor (mapped now if it is not yet)."""
        key = (ref.kind, ref.name, ref.nbytes)
        mapping = self.maps[key][0] if key in self.maps else MappedStore(ref)
        self.maps[key] = (mapping, self.push)
        return mapping.flat

    def unmap_stale(self) -> None:
        for key, (mapping, last) in list(self.maps.items()):
            if last < self.push - 2:
                mapping.close()
                del self.maps[key]

    def __len__(self) -> int:
        return len(self.maps)

    def close(self) -> None:
        for mapping, _ in self.maps.values():
            mapping.close()
        self.maps.clear()
