"""KV pool: slot allocator, request-to-token table, budget sizing, one-time allocation."""

from __future__ import annotations

import pytest
import torch

from infer_side.engines.native.kv_pool import (
    KVPool,
    ReqToTokenTable,
    SlotAllocator,
    slots_for_bytes,
)
from rlsync.model_config import ModelConfig

CPU = torch.device("cpu")


def test_alloc_hands_out_distinct_slots_until_empty():
    alloc = SlotAllocator(10, CPU)
    a, b = alloc.alloc(4), alloc.alloc(6)
    assert a.dtype == torch.int64
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    assert alloc.available == 0
    assert alloc.alloc(1) is None


def test_alloc_refuses_without_side_effects():
    alloc = SlotAllocator(5, CPU)
    alloc.alloc(3)
    assert alloc.alloc(3) is None
    assert alloc.available == 2
    assert alloc.alloc(2).numel() == 2


def test_freed_slots_are_reused_and_counted():
    alloc = SlotAllocator(8, CPU)
    a = alloc.alloc(8)
    alloc.free(a[2:5])
    alloc.free(torch.empty(0, dtype=torch.int64))
    assert alloc.available == 3
    again = alloc.alloc(3)
    assert sorted(again.tolist()) == [2, 3, 4]
    assert alloc.available == 0


def test_lazy_merge_keeps_every_slot_exactly_once():
    alloc = SlotAllocator(16, CPU)
    held = [alloc.alloc(4) for _ in range(4)]
    alloc.free(held[1])
    alloc.free(held[3])
    assert sorted(alloc.free_slots().tolist()) == sorted(held[1].tolist() + held[3].tolist())
    got = alloc.alloc(8)
    assert sorted(got.tolist()) == sorted(held[1].tolist() + held[3].tolist())


def test_clear_frees_everything():
    alloc = SlotAllocator(6, CPU)
    alloc.alloc(5)
    alloc.clear()
    assert alloc.available == 6
    assert sorted(alloc.free_slots().tolist()) == list(range(6))


def test_table_rows_and_slot_rows():
    table = ReqToTokenTable(rows=2, max_len=8, device=CPU)
    r0, r1 = table.alloc_row(), table.alloc_row()
    assert {r0, r1} == {0, 1}
    assert table.alloc_row() is None
    table.write(r1, 0, torch.tensor([5, 6, 7]))
    table.write(r1, 3, torch.tensor([9]))
    assert table.read(r1, 0, 4).tolist() == [5, 6, 7, 9]
    assert table.read(r1, 2, 4).tolist() == [7, 9]
    table.free_row(r0)
    assert table.free_rows == 1
    table.clear()
    assert table.free_rows == 2


def test_slots_for_bytes_matches_tensor_sizes():
    cfg = ModelConfig(
        num_hidden_layers=3, num_key_value_heads=2, hidden_size=64, num_attention_heads=4
    )
    per_slot = 2 * 3 * 2 * 16 * 2  # K and V, layers, kv heads, head_dim, bf16 bytes
    assert slots_for_bytes(cfg, torch.bfloat16, 100 * per_slot + 7) == 100
    assert slots_for_bytes(cfg, torch.float32, 100 * per_slot) == 50


def test_create_allocates_pool_once_with_model_layout():
    cfg = ModelConfig(
        num_hidden_layers=2,
        num_key_value_heads=2,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    pool = KVPool.create(cfg, 40, torch.float32, CPU, max_requests=3)
    assert pool.k.shape == pool.v.shape == (2, 40, 2, 8)
    assert pool.size == pool.available == 40
    assert pool.table.table.shape == (3, 40)  # rows never longer than the pool
    k_ptr = pool.k.data_ptr()
    slots = pool.alloc(10)
    assert pool.used == 10
    pool.free(slots)
    pool.clear()
    assert pool.available == 40 and pool.table.free_rows == 3
    assert pool.k.data_ptr() == k_ptr  # never reallocated


def test_create_accepts_custom_allocator():
    cfg = ModelConfig()
    calls = []

    def allocate(c, n, dtype, device):
        calls.append((n, dtype))
        return torch.zeros(1, n, 1, 2), torch.zeros(1, n, 1, 2)

    pool = KVPool.create(cfg, 12, torch.float16, CPU, max_requests=1, allocate=allocate)
    assert calls == [(12, torch.float16)]
    assert pool.size == 12


@pytest.mark.parametrize("n", [0, 1, 7])
def test_alloc_zero_and_small(n):
    alloc = SlotAllocator(7, CPU)
    assert alloc.alloc(n).numel() == n
    assert alloc.available == 7 - n
