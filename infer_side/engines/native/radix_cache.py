"""Radix prefix cache: a tree over token ids whose nodes own the KV slots of those tokens.

A request's prompt is matched against the tree (`match_prefix`) so its cached prefix needs no
recompute; finished (and freshly prefilled) sequences are inserted back (`insert`). Nodes used
by running requests are locked (`lock`/`unlock`, counted along the path to the root) and never
evicted; unlocked leaves are evicted least-recently-used first when the pool runs short.

`invalidate()` is for weight changes under an in_place pause: every node leaves the tree at
once, so no later request can match KV computed with old weights; unlocked nodes free their
slots immediately, locked ("dead") ones keep them until the last request using them unlocks.

Slot ownership is exact: a slot is free in the allocator, owned by one tree node (live or
dead), or private to one request. `check_invariants` proves it. The tree knows nothing about
requests, the model or weights.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import torch

from infer_side.engines.native.kv_pool import SlotAllocator


class Node:
    """A run of tokens (`key`) with their slots (`value`); children keyed by first token."""

    def __init__(self, key: list[int], value: torch.Tensor, parent: Node | None):
        self.key, self.value, self.parent = key, value, parent
        self.children: dict[int, Node] = {}
        self.lock_ref = 0
        self.last_access = 0
        self.dead = False

    def __lt__(self, other: Node) -> bool:
        return self.last_access < other.last_access


def _common_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixCache:
    """Prefix tree of cached KV; frees evicted slots into `allocator`."""

    def __init__(self, allocator: SlotAllocator):
        self.allocator = allocator
        self._clock = itertools.count(1)
        self.epoch = 0
        """Bumped by reset/invalidate: a request matched in an older epoch must not insert."""
        self.root = Node([], torch.empty(0, dtype=torch.int64, device=allocator.device), None)
        self.root.lock_ref = 1
        self._clear_tree()

    def _clear_tree(self) -> None:
        # The root object survives: dead nodes still walk up to it when they unlock.
        self.root.children = {}
        self.evictable_size = 0
        self.protected_size = 0
        self._dead: set[Node] = set()

    # ------------------------------------------------------------------ matching and inserting

    def match_prefix(self, tokens: Sequence[int]) -> tuple[torch.Tensor, Node]:
        """Slots of the longest cached prefix of `tokens`, and the node that ends it."""
        node, pos, parts = self.root, 0, []
        while pos < len(tokens) and (child := node.children.get(tokens[pos])) is not None:
            n = _common_len(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(self._clock)
            parts.append(child.value)
            node, pos = child, pos + n
        return (torch.cat(parts) if parts else self.root.value), node

    def insert(self, tokens: Sequence[int], slots: torch.Tensor) -> int:
        """Cache `slots` for `tokens`; returns how many leading tokens were cached already.

        The tree keeps its own slots for that prefix: the caller still owns (and must free
        or drop) `slots[:returned]` unless they are the very slots it matched.
        """
        assert len(tokens) == slots.numel()
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                self._add_leaf(node, list(tokens[pos:]), slots[pos:].clone())
                return pos
            n = _common_len(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(self._clock)
            node, pos = child, pos + n
        return pos

    def _add_leaf(self, parent: Node, key: list[int], value: torch.Tensor) -> None:
        leaf = Node(key, value, parent)
        leaf.last_access = next(self._clock)
        parent.children[key[0]] = leaf
        self.evictable_size += len(key)

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child` after `n` tokens; returns the new upper node (same locks, same age)."""
        upper = Node(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        child.parent.children[child.key[0]] = upper
        child.key, child.value, child.parent = child.key[n:], child.value[n:], upper
        upper.children[child.key[0]] = child
        return upper

    # ------------------------------------------------------------------ locking

    def lock(self, node: Node) -> None:
        """Protect `node` and its ancestors from eviction (one count per running request)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        """Undo one `lock`; a dead node whose last user leaves frees its slots."""
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._on_unlocked(node)
            node = node.parent

    def _on_unlocked(self, node: Node) -> None:
        if node.dead:
            self._dead.discard(node)
            self.allocator.free(node.value)
        else:
            self.evictable_size += len(node.key)
            self.protected_size -= len(node.key)

    # ------------------------------------------------------------------ eviction and resets

    def evict(self, num_slots: int) -> int:
        """Free at least `num_slots` slots from unlocked leaves, oldest first; returns freed."""
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_slots and heap:
            leaf = heapq.heappop(heap)
            freed += self._remove_leaf(leaf)
            parent = leaf.parent
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    def _remove_leaf(self, leaf: Node) -> int:
        del leaf.parent.children[leaf.key[0]]
        self.allocator.free(leaf.value)
        self.evictable_size -= len(leaf.key)
        return len(leaf.key)

    def reset(self) -> None:
        """Drop the whole tree and free its slots; only when no request holds a node."""
        if self.protected_size or self._dead:
            raise RuntimeError("prefix cache reset while running requests hold cached prefixes")
        for node in self._nodes():
            self.allocator.free(node.value)
        self.epoch += 1
        self._clear_tree()

    def invalidate(self) -> None:
        """Hide every cached prefix now; locked nodes free their slots at their last unlock."""
        dead = set(self._dead)
        for node in self._nodes():
            if node.lock_ref:
                node.dead = True
                dead.add(node)
            else:
                self.allocator.free(node.value)
        self.epoch += 1
        self._clear_tree()
        self._dead = dead

    # ------------------------------------------------------------------ inspection

    def _nodes(self) -> list[Node]:
        """Every live node below the root."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def num_nodes(self) -> int:
        return len(self._nodes())

    @property
    def num_tokens(self) -> int:
        """Tokens matchable now (live tree)."""
        return self.evictable_size + self.protected_size

    def owned_slots(self) -> torch.Tensor:
        """Every slot the tree owns, live and dead nodes alike."""
        parts = [n.value for n in self._nodes()] + [n.value for n in self._dead]
        return torch.cat([self.root.value, *parts])

    def check_invariants(self, private: Sequence[torch.Tensor] = ()) -> None:
        """Assert sizes and that free + tree + `private` slots cover the pool exactly once."""
        live = self._nodes()
        assert sum(len(n.key) for n in live if n.lock_ref == 0) == self.evictable_size
        assert sum(len(n.key) for n in live if n.lock_ref > 0) == self.protected_size
        for node in live:
            assert len(node.key) == node.value.numel() > 0
            assert node.parent.children[node.key[0]] is node
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values())
        assert all(n.dead and n.lock_ref > 0 for n in self._dead)
        everything = torch.cat([self.allocator.free_slots(), self.owned_slots(), *private])
        counts = torch.bincount(everything.cpu(), minlength=self.allocator.size)
        assert counts.numel() == self.allocator.size, "slot id out of range"
        assert bool((counts == 1).all()), (
            f"slot ownership broken: {int((counts == 0).sum())} lost, "
            f"{int((counts > 1).sum())} owned twice"
        )
