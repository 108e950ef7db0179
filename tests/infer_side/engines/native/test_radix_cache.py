"""Radix prefix cache: matching, splitting, locks, LRU eviction, reset, invalidate, ownership."""

from __future__ import annotations

import pytest
import torch

from infer_side.engines.native.kv_pool import SlotAllocator
from infer_side.engines.native.radix_cache import RadixCache

CPU = torch.device("cpu")


def make(size: int = 64) -> tuple[SlotAllocator, RadixCache]:
    alloc = SlotAllocator(size, CPU)
    return alloc, RadixCache(alloc)


def cache_seq(alloc: SlotAllocator, cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """What a finished request does: its slots go to the tree, duplicates back to the pool."""
    slots = alloc.alloc(len(tokens))
    known = cache.insert(tokens, slots)
    alloc.free(slots[:known])
    return slots


def test_empty_tree_matches_nothing():
    _, cache = make()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is cache.root
    cache.check_invariants()


def test_insert_then_match_longest_prefix():
    alloc, cache = make()
    slots = cache_seq(alloc, cache, [1, 2, 3, 4])
    got, _ = cache.match_prefix([1, 2, 3, 4, 5])
    assert got.tolist() == slots.tolist()
    got, _ = cache.match_prefix([1, 2, 9])
    assert got.tolist() == slots[:2].tolist()
    assert cache.num_tokens == 4
    cache.check_invariants()


def test_insert_reports_cached_prefix_and_splits():
    alloc, cache = make()
    first = cache_seq(alloc, cache, [1, 2, 3, 4])
    second = alloc.alloc(5)
    assert cache.insert([1, 2, 7, 8, 9], second) == 2
    alloc.free(second[:2])
    assert cache.num_tokens == 4 + 3
    assert cache.num_nodes == 3  # [1,2] -> [3,4] and [7,8,9]
    got, _ = cache.match_prefix([1, 2, 7, 8, 9])
    assert got.tolist() == first[:2].tolist() + second[2:].tolist()
    cache.check_invariants()


def test_insert_of_cached_sequence_keeps_tree_slots():
    alloc, cache = make()
    first = cache_seq(alloc, cache, [5, 6, 7])
    dup = alloc.alloc(3)
    assert cache.insert([5, 6, 7], dup) == 3
    alloc.free(dup)
    assert cache.match_prefix([5, 6, 7])[0].tolist() == first.tolist()
    cache.check_invariants()


def test_lock_protects_from_eviction_and_unlock_releases():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3])
    cache_seq(alloc, cache, [4, 5])
    _, node = cache.match_prefix([1, 2, 3])
    cache.lock(node)
    assert cache.protected_size == 3 and cache.evictable_size == 2
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3])[0].numel() == 3
    cache.unlock(node)
    assert cache.evictable_size == 3
    assert cache.evict(1) == 3
    assert cache.num_tokens == 0 and alloc.available == 64
    cache.check_invariants()


def test_lock_on_split_node_counts_along_path():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.lock(node)
    cache_seq(alloc, cache, [1, 2, 9])  # splits the locked node
    assert cache.protected_size == 4 and cache.evictable_size == 1
    cache.unlock(node)
    assert cache.protected_size == 0 and cache.evictable_size == 5
    cache.check_invariants()


def test_evicts_least_recently_used_leaves_first():
    alloc, cache = make()
    for tokens in ([1, 1], [2, 2], [3, 3]):
        cache_seq(alloc, cache, tokens)
    cache.match_prefix([1, 1])  # touch: [2,2] is now the oldest
    assert cache.evict(2) == 2
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].numel() == 2
    assert cache.evict(1) == 2
    assert cache.match_prefix([3, 3])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].numel() == 2
    cache.check_invariants()


def test_eviction_climbs_to_parents_once_they_become_leaves():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3])
    cache_seq(alloc, cache, [1, 2, 4, 5])
    assert cache.evict(100) == 5
    assert cache.num_nodes == 0 and alloc.available == 64
    cache.check_invariants()


def test_reset_frees_tree_and_bumps_epoch():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3])
    epoch = cache.epoch
    cache.reset()
    assert alloc.available == 64 and cache.num_nodes == 0 and cache.epoch == epoch + 1
    cache.check_invariants()


def test_reset_refuses_while_locked():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3])
    cache.lock(cache.match_prefix([1, 2, 3])[1])
    with pytest.raises(RuntimeError, match="running requests"):
        cache.reset()


def test_invalidate_hides_everything_and_frees_unlocked_now():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2, 3, 4])
    cache_seq(alloc, cache, [7, 8])
    prefix, node = cache.match_prefix([1, 2, 3])
    cache.lock(node)
    private = alloc.alloc(5)  # the running request's own tokens
    cache.invalidate()
    # Nothing matches any more, but the locked prefix [1,2,3] still owns its slots.
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 0
    assert cache.match_prefix([7, 8])[0].numel() == 0
    assert alloc.available == 64 - 3 - 5
    cache.check_invariants([private])
    # A new sequence with the same tokens gets fresh slots, never the stale ones.
    fresh = cache_seq(alloc, cache, [1, 2, 3])
    assert not set(fresh.tolist()) & set(prefix.tolist())
    cache.check_invariants([private])
    cache.unlock(node)
    alloc.free(private)
    assert alloc.available == 64 - 3
    cache.check_invariants()


def test_invalidate_twice_keeps_older_dead_nodes():
    alloc, cache = make()
    cache_seq(alloc, cache, [1, 2])
    _, old = cache.match_prefix([1, 2])
    cache.lock(old)
    cache.invalidate()
    cache_seq(alloc, cache, [3, 4])
    _, new = cache.match_prefix([3, 4])
    cache.lock(new)
    cache.invalidate()
    assert alloc.available == 64 - 4
    cache.check_invariants()
    cache.unlock(old)
    cache.unlock(new)
    assert alloc.available == 64
    cache.check_invariants()


def test_check_invariants_catches_leaks_and_double_ownership():
    alloc, cache = make(8)
    cache_seq(alloc, cache, [1, 2])
    leaked = alloc.alloc(3)
    with pytest.raises(AssertionError, match="3 lost"):
        cache.check_invariants()
    cache.check_invariants([leaked])
    with pytest.raises(AssertionError, match="owned twice"):
        cache.check_invariants([leaked, leaked[:1]])
