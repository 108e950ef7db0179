"""Continuous-batching scheduler: which requests run each step, and who owns each KV slot.

One `step()`:
  1. give every running request a slot for its next token; when the pool is short even after
     evicting unlocked prefix-cache leaves, retract the newest running request (its KV is
     freed and it goes back to the front of the waiting queue, to restart later);
  2. unless something was retracted (or admission is held), admit waiting requests in order
     while `max_running`, `max_prefill_tokens` and the pool allow, matching each prompt
     against the prefix cache first;
  3. run ONE forward over a ForwardBatch that mixes the new prompts and the decodes;
  4. sample, record tokens, cache freshly prefilled prompts in the prefix tree, finish
     requests that hit a stop token or their length, and return their outputs (plus a
     chunk per streaming request).

Slot ownership (checked by `check_invariants`): every slot is free, owned by the prefix tree,
or private to exactly one running request. The scheduler knows nothing about messages other
than GenerateOutput, weight versions beyond the number it is handed, or how the model works.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import torch

from infer_side.engines.native.forward_batch import ForwardBatch
from infer_side.engines.native.kv_pool import KVPool
from infer_side.engines.native.radix_cache import RadixCache
from infer_side.engines.native.sampling import sample
from infer_side.engines.request import Request
from rlsync.wire.protocol import GenerateOutput

ForwardFn = Callable[[ForwardBatch], torch.Tensor]

DECODE_RESERVE = 0.5
"""Admission keeps free (or evictable) slots for this fraction of the tokens the running
requests may still generate, so new prompts rarely force a retraction a few steps later."""


class Scheduler:
    """Waiting queue + running batch over one KV pool and prefix cache."""

    def __init__(
        self,
        pool: KVPool,
        cache: RadixCache,
        forward: ForwardFn,
        max_running: int,
        max_prefill_tokens: int,
    ):
        self.pool, self.cache, self.forward = pool, cache, forward
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_retracted = 0

    # ------------------------------------------------------------------ queues

    def add(self, req: Request) -> None:
        assert req.rid not in self._by_id, f"duplicate request id {req.rid!r}"
        self._by_id[req.rid] = req
        self.waiting.append(req)

    def get(self, rid: str) -> Request | None:
        """The waiting or running request with this id."""
        return self._by_id.get(rid)

    def counts(self) -> tuple[int, int]:
        return len(self.waiting), len(self.running)

    def abort(self, rid: str, version: int) -> GenerateOutput | None:
        """Finish request `rid` with reason "abort"; None if it is not in flight."""
        req = self.get(rid)
        if req is None:
            return None
        if req.row is None:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._release(req, cache=True)
        del self._by_id[rid]
        req.finish_reason = "abort"
        return req.output(True, version)

    def abort_all(self, version: int) -> list[GenerateOutput]:
        rids = [r.rid for r in (*self.running, *self.waiting)]
        return [out for rid in rids if (out := self.abort(rid, version)) is not None]

    def retract_all(self) -> None:
        """Every running request frees its KV and goes back to the front of the queue, in order."""
        for req in reversed(list(self.running)):
            self._retract(req)

    def recompute_all(self) -> None:
        """After a weight swap: every running request frees its KV (computed with the old
        weights) and goes back to the front of the queue with all its tokens, so it resumes
        by recomputing that KV with the new weights (unlike a retraction, nothing is redone)."""
        for req in reversed(list(self.running)):
            self._requeue(req)

    def reset_kv(self) -> None:
        """Empty the prefix cache, the table and the allocator; no running request may hold KV."""
        if self.running:
            raise RuntimeError(f"reset_kv with {len(self.running)} running requests holding KV")
        self.cache.reset()
        self.pool.clear()

    # ------------------------------------------------------------------ one step

    def step(self, version: int, admit: bool = True) -> list[GenerateOutput]:
        """Run one forward over the running batch; returns stream chunks and finished outputs."""
        retracted = self._reserve_decodes()
        if admit and not retracted:
            self._admit()
        if not self.running:
            return []
        reqs = list(self.running)
        logits = self.forward(self._build_batch(reqs))
        prefilled = [r.kv_len < len(r.prompt) for r in reqs]
        for req in reqs:
            req.kv_len = req.held_len
        tokens, logprobs = sample(
            logits,
            [r.params for r in reqs],
            [r.seed for r in reqs],
            [len(r.output_ids) for r in reqs],
        )
        return self._commit(reqs, tokens.tolist(), logprobs.tolist(), prefilled, version)

    def _build_batch(self, reqs: list[Request]) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        seq_slots, new_lens = [], []
        for req in reqs:
            ids.extend(req.tokens_from(req.kv_len))
            positions.extend(range(req.kv_len, req.held_len))
            rows.extend([req.row] * (req.held_len - req.kv_len))
            seq_slots.append(self.pool.table.read(req.row, 0, req.held_len))
            new_lens.append(req.held_len - req.kv_len)
        dev = self.pool.device
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=pos,
            out_slots=self.pool.table.gather(rows, pos),
            seq_slots=seq_slots,
            new_lens=new_lens,
        )

    def _commit(
        self,
        reqs: list[Request],
        tokens: list[int],
        logprobs: list[float],
        prefilled: list[bool],
        version: int,
    ) -> list[GenerateOutput]:
        outputs = []
        for req, token, logprob, fresh in zip(reqs, tokens, logprobs, prefilled, strict=True):
            req.append_token(token, logprob, version)
            if req.finish_reason is not None:
                self.running.remove(req)
                del self._by_id[req.rid]
                self._release(req, cache=True)
                outputs.append(req.output(True, version))
                continue
            if fresh:
                self._cache_progress(req)
            if req.stream:
                outputs.append(req.output(False, version))
        return outputs

    # ------------------------------------------------------------------ admission and growth

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            new_tokens = self._try_admit(self.waiting[0], budget)
            if new_tokens is None:
                return
            budget -= new_tokens
            self.running.append(self.waiting.popleft())

    def _try_admit(self, req: Request, budget: int) -> int | None:
        """Give `req` its cached prefix and slots for the rest; returns its new-token count."""
        ids = req.all_ids
        prefix, node = self.cache.match_prefix(ids[:-1])
        new_tokens = len(ids) - prefix.numel()
        if new_tokens > budget and budget < self.max_prefill_tokens:
            return None  # the first prompt of a step may exceed the budget (no chunking)
        self.cache.lock(node)
        slots = self._alloc(new_tokens, reserve=self._decode_reserve(req))
        if slots is None:
            self.cache.unlock(node)
            return None
        row = self.pool.table.alloc_row()
        assert row is not None, "table rows == max_running"
        self.pool.table.write(row, 0, prefix)
        self.pool.table.write(row, prefix.numel(), slots)
        req.row, req.node, req.epoch = row, node, self.cache.epoch
        req.prefix_len, req.held_len, req.kv_len = prefix.numel(), len(ids), prefix.numel()
        req.cached_tokens = min(prefix.numel(), len(req.prompt))
        return new_tokens

    def _decode_reserve(self, new: Request) -> int:
        left = sum(r.remaining for r in self.running) + new.remaining
        return math.ceil(left * DECODE_RESERVE)

    def _reserve_decodes(self) -> bool:
        """A slot for every running request's next token; returns whether any was retracted."""
        if self._extend_all():
            return False
        retracted = False
        for req in list(self.running):
            while req.row is not None and not self._extend(req):
                self._retract(self.running[-1])
                retracted = True
        return retracted

    def _extend_all(self) -> bool:
        """Fast path: one allocation and one table write for the whole running batch."""
        needs = [r.num_tokens - r.held_len for r in self.running]
        slots = self._alloc(sum(needs))
        if slots is None:
            return False
        rows = [r.row for r, n in zip(self.running, needs, strict=True) for _ in range(n)]
        cols = [r.held_len + i for r, n in zip(self.running, needs, strict=True) for i in range(n)]
        self.pool.table.scatter(rows, cols, slots)
        for req, n in zip(self.running, needs, strict=True):
            req.held_len += n
        return True

    def _extend(self, req: Request) -> bool:
        need = req.num_tokens - req.held_len
        slots = self._alloc(need)
        if slots is None:
            return False
        self.pool.table.write(req.row, req.held_len, slots)
        req.held_len += need
        return True

    def _alloc(self, n: int, reserve: int = 0) -> torch.Tensor | None:
        """`n` slots, evicting LRU prefix-cache leaves if needed, keeping `reserve` more free."""
        short = n + reserve - self.pool.available
        if short > 0:
            if short > self.cache.evictable_size:
                return None
            self.cache.evict(short)
        return self.pool.alloc(n)

    # ------------------------------------------------------------------ giving KV back

    def _retract(self, req: Request) -> None:
        self._requeue(req)
        req.restart()  # the tokens the client has not seen are generated again
        self.num_retracted += 1

    def _requeue(self, req: Request) -> None:
        """A running request frees its KV and goes back to the front of the queue."""
        self.running.remove(req)
        self._release(req, cache=False)
        self.waiting.appendleft(req)

    def _release(self, req: Request, cache: bool) -> None:
        """Free the request's KV; with `cache`, its computed tokens go to the prefix tree first."""
        if cache:
            self._cache_progress(req)
        self.pool.free(self.pool.table.read(req.row, req.prefix_len, req.held_len).clone())
        if req.node is not None:
            self.cache.unlock(req.node)
        self.pool.table.free_row(req.row)
        req.detach_kv()

    def _cache_progress(self, req: Request) -> None:
        """Insert the request's computed tokens into the tree and point its row at the tree's
        slots (duplicates of tokens cached meanwhile are freed). Skipped after an invalidate:
        KV of an older epoch may come from older weights and must never be matched."""
        if req.epoch != self.cache.epoch or req.kv_len == req.prefix_len:
            return
        tokens = req.all_ids[: req.kv_len]
        mine = self.pool.table.read(req.row, 0, req.kv_len).clone()
        known = self.cache.insert(tokens, mine)
        self.pool.free(mine[req.prefix_len : known])
        slots, node = self.cache.match_prefix(tokens)
        self.pool.table.write(req.row, 0, slots)
        self.cache.lock(node)
        self.cache.unlock(req.node)
        req.node, req.prefix_len = node, req.kv_len

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Assert exact slot ownership and queue consistency (tests call this after steps)."""
        assert all(r.row is None for r in self.waiting)
        assert len(self._by_id) == len(self.waiting) + len(self.running)
        assert all(
            r.row is not None and r.prefix_len <= r.kv_len <= r.held_len for r in self.running
        )
        assert self.pool.table.free_rows == self.pool.table.rows - len(self.running)
        private = [self.pool.table.read(r.row, r.prefix_len, r.held_len) for r in self.running]
        self.cache.check_invariants(private)
