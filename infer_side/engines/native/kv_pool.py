"""The engine's KV memory: K/V pool tensors, a free-slot allocator and the request-to-token table.

Everything here is allocated once, when the engine starts, from a token budget
(`EngineConfig.kv_tokens`) or a bytes budget (`slots_for_bytes`). A *slot* holds the K and V
of one token in every layer; slot ids index dim 1 of the pool tensors
`[num_layers, num_slots, num_kv_heads, head_dim]`. The table maps each running request (by
row) to the slots of its tokens in order, so a ForwardBatch can hand the model views of it.

This module knows nothing about requests, the prefix tree or the model's attention; who owns
which slot is the scheduler's and the prefix cache's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlsync.model_config import ModelConfig

KVAllocateFn = Callable[
    [ModelConfig, int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]
]


def slots_for_bytes(cfg: ModelConfig, dtype: torch.dtype, kv_bytes: int) -> int:
    """How many token slots a K+V pool of `kv_bytes` holds for this architecture."""
    assert cfg.head_dim is not None
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return kv_bytes // per_slot


class SlotAllocator:
    """Free list of KV slot ids. Freed slots are parked and merged lazily on the next alloc."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self.clear()

    def clear(self) -> None:
        """Every slot free again (the pool tensors keep their stale bytes; nothing reads them)."""
        self._free = torch.arange(self.size, dtype=torch.int64, device=self.device)
        self._released: list[torch.Tensor] = []
        self._num_free = self.size

    @property
    def available(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free slot ids (int64), or None when fewer than `n` are free (nothing changes)."""
        if n > self._num_free:
            return None
        if n > self._free.numel():
            self._free = torch.cat([self._free, *self._released])
            self._released = []
        out, self._free = self._free[:n], self._free[n:]
        self._num_free -= n
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._released.append(slots)
            self._num_free += slots.numel()

    def free_slots(self) -> torch.Tensor:
        """All free slot ids (for invariant checks)."""
        return torch.cat([self._free, *self._released])


class ReqToTokenTable:
    """Row r holds the slot ids of a running request's tokens, position by position."""

    def __init__(self, rows: int, max_len: int, device: torch.device):
        self.rows, self.max_len = rows, max_len
        self.table = torch.zeros((rows, max_len), dtype=torch.int64, device=device)
        self.clear()

    def clear(self) -> None:
        self._free_rows = list(range(self.rows - 1, -1, -1))

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start : start + slots.numel()] = slots

    def scatter(self, rows: list[int], cols: list[int], slots: torch.Tensor) -> None:
        """table[rows[i], cols[i]] = slots[i] for every i, in one write."""
        self.table[
            torch.tensor(rows, dtype=torch.int64, device=self.table.device),
            torch.tensor(cols, dtype=torch.int64, device=self.table.device),
        ] = slots

    def gather(self, rows: list[int], cols: torch.Tensor) -> torch.Tensor:
        """table[rows[i], cols[i]] for every i (a copy)."""
        return self.table[torch.tensor(rows, dtype=torch.int64, device=self.table.device), cols]

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Slots of positions [start, end) of `row` (a view: copy it to keep it)."""
        return self.table[row, start:end]


class KVPool:
    """K/V tensors plus the allocator and table that say which slots are in use."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, max_requests: int, max_len: int):
        self.k, self.v = k, v
        self.size = k.shape[1]
        self.device = k.device
        self.allocator = SlotAllocator(self.size, self.device)
        self.table = ReqToTokenTable(max_requests, max_len, self.device)

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        max_requests: int,
        allocate: KVAllocateFn | None = None,
    ) -> KVPool:
        """Allocate the pool once. A table row fits the longest sequence that can exist here:
        `max_position_embeddings` tokens, or the whole pool if that is smaller."""
        if allocate is None:
            from infer_side.engines.native.model import allocate_kv_cache as allocate
        k, v = allocate(cfg, num_slots, dtype, device)
        return cls(k, v, max_requests, min(cfg.max_position_embeddings, num_slots))

    @property
    def available(self) -> int:
        return self.allocator.available

    @property
    def used(self) -> int:
        return self.size - self.allocator.available

    def alloc(self, n: int) -> torch.Tensor | None:
        return self.allocator.alloc(n)

    def free(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    def clear(self) -> None:
        """Forget every slot owner: all slots free, all table rows free."""
        self.allocator.clear()
        self.table.clear()
