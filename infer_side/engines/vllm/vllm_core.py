"""The vLLM backend: a real vLLM engine, in this process, behind our protocol and update rules.

Our loop (`infer_side.process.server`) steps vLLM's `LLMEngine` as it steps our own scheduler; the
messages, outbox and update machine are `infer_side.engines.core_base`'s. What differs:

- Generation: each Generate becomes a vLLM request (token ids in, no tokenizer), asking for
  the sampled token's logprob under the distribution it was drawn from (after temperature,
  top-k, top-p: what PPO's ratio needs). Its outputs are re-emitted as ours: per-token weight versions,
  cached-token counts, finish reasons. Requests held while an update waits for idle stay here
  until admission opens; `retract` aborts them in vLLM and re-adds them later (the KV is
  recomputed, as ours does). After a swap under an in_place pause, requests keep every token
  and are re-added with their KV recomputed, so each token's version is exact.
- Weights: vLLM packs its linear weights for the CPU GEMM and cannot hand out writable views
  of them. So the live store the update machine sees is a staging copy in Hugging Face layout
  (`ModelWeights`). in_place: generation is refused, and as each bucket lands its complete
  fused groups are loaded through vLLM's own reload path (which handles the fused q/k/v and
  gate/up layers), so the load overlaps the transfer (`GroupLoader`). shadow: the update lands
  in a second copy while vLLM keeps generating, and `apply_weights` loads all of it between
  two steps. A fused group is never loaded in parts: vLLM silently corrupts a half-loaded one.
  A tied model's embedding is also loaded as its head: vLLM re-packs the head it computes
  logits with only when the head itself is loaded (`_with_tied_head`).
- Cache: vLLM does not drop its prefix cache when weights change; `flush_kv` resets it after
  every update that asks for a flush (the default; running requests are retracted first, so
  no KV of the old weights survives). With `flush_cache=False` old KV stays matchable, as on
  our engine: the caller's choice.
  `torch.cuda.empty_cache()` runs only when asked, and only on CUDA.
- Fingerprints are of the staging copy: they prove which bytes vLLM was last loaded with
  (per Hugging Face name); that vLLM computes with them is checked by tokens in the tests.

`llm` is anything with LLMEngine's add_request/step/abort_request/reset_prefix_cache/
collective_rpc (tests use a fake of it); `from_checkpoint` builds the real one.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

from infer_side.engines.checkpoint import EMBED, TIED_HEAD
from infer_side.engines.core_base import CoreBase, release_cuda_cache
from infer_side.engines.request import Request
from infer_side.engines.weights import ModelWeights
from rlsync.config import EngineConfig
from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import dtype_name
from rlsync.transports import disk
from rlsync.wire.protocol import PAUSE_MODES, EngineInfo, GenerateOutput, PauseMode

BLOCK_SIZE = 32
"""vLLM's CPU attention needs a multiple of 32 (prefix caching works in these blocks)."""


class VllmCore(CoreBase):
    """A vLLM engine stepped by our loop. See the module docstring."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        weights: ModelWeights,
        llm: Any,
        engine_cfg: EngineConfig,
        max_model_len: int,
        sampling_params: Any = None,
    ):
        """`sampling_params`: vLLM's SamplingParams class (default: imported from vllm)."""
        self.model_cfg, self.engine_cfg = model_cfg, engine_cfg
        self.llm = Serialized(llm)
        self.sampling_params = sampling_params
        self.mirror = weights
        self.device = weights.device
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        """Every request in flight, by id (held here or inside vLLM)."""
        self.held: deque[Request] = deque()
        """Not yet given to vLLM: admission held, or retracted."""
        self.base: dict[str, int] = {}
        """Output tokens a request had when (re)submitted to vLLM."""
        self.num_retracted = 0
        self.streamed: GroupLoader | None = None
        super().__init__()
        self.disk_receiver = disk.Receiver(engine_cfg.disk_root)
        """Disk updates load only under engine_cfg.disk_root (its default: the temp dir)."""
        self.updates.receivers[disk.Receiver.kind] = self.disk_receiver

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, engine_cfg: EngineConfig, *, exposed: bool = False
    ) -> VllmCore:
        """`exposed` is ignored: vLLM's parameters are its own, so updates always stage
        through a private mirror."""
        from infer_side.engines.checkpoint import load_model

        model_cfg, weights = load_model(path, dtype=engine_cfg.dtype, device=engine_cfg.device)
        max_len = min(model_cfg.max_position_embeddings, engine_cfg.kv_tokens)
        return cls(
            model_cfg,
            weights,
            _build_llm(path, engine_cfg, weights.dtype, max_len),
            engine_cfg,
            max_len,
        )

    # ------------------------------------------------------------------ generation hooks

    def _add(self, req: Request) -> None:
        self.requests[req.rid] = req
        self.held.append(req)

    def _step(self, admit: bool) -> list[GenerateOutput]:
        if admit:
            while self.held:
                self._submit(self.held.popleft())
        if len(self.held) == len(self.requests):
            return []  # nothing inside vLLM
        out = []
        for result in self.llm.step():
            req = self.requests.get(result.request_id)
            if req is not None:
                out.extend(self._absorb(req, result))
        return out

    def _submit(self, req: Request) -> None:
        if self.sampling_params is None:
            from vllm import SamplingParams

            self.sampling_params = SamplingParams
        p = req.params
        params = self.sampling_params(
            max_tokens=req.remaining,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=req.seed,
            stop_token_ids=list(p.stop_token_ids),
            logprobs=0,
            detokenize=False,
            ignore_eos=True,
        )
        self.base[req.rid] = len(req.output_ids)
        self.llm.add_request(req.rid, {"prompt_token_ids": req.all_ids}, params)

    def _absorb(self, req: Request, result: Any) -> list[GenerateOutput]:
        """Append the tokens vLLM produced since the last step; emit a chunk or the final."""
        completion = result.outputs[0]
        seen = len(req.output_ids) - self.base[req.rid]
        for i in range(seen, len(completion.token_ids)):
            token = completion.token_ids[i]
            req.append_token(token, completion.logprobs[i][token].logprob, self.weight_version)
        if self.base[req.rid] == 0 and result.num_cached_tokens is not None:
            req.cached_tokens = result.num_cached_tokens
        if result.finished:
            req.finish_reason = req.finish_reason or completion.finish_reason or "length"
            return [self._finish(req)]
        if req.stream and len(req.output_ids) > req.sent:
            return [req.output(False, self.weight_version)]
        return []

    def _finish(self, req: Request) -> GenerateOutput:
        del self.requests[req.rid]
        self.base.pop(req.rid, None)
        return req.output(True, self.weight_version)

    def _in_flight(self, request_id: str) -> bool:
        return request_id in self.requests

    def _token_capacity(self) -> int:
        return self.max_model_len

    def abort(self, request_id: str) -> bool:
        """Finish one request with reason "abort"; False if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req in self.held:
            self.held.remove(req)
        else:
            self.llm.abort_request([request_id])
        req.finish_reason = "abort"
        self._outbox.append(self._finish(req))
        return True

    def counts(self) -> tuple[int, int]:
        """(waiting: held here, running: inside vLLM)."""
        return len(self.held), len(self.requests) - len(self.held)

    def pause(self, mode: PauseMode) -> None:
        """abort: finish everything with "abort"; retract: take every request out of vLLM
        (its KV is dropped) to be re-added on continue; in_place: just stop stepping."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {list(PAUSE_MODES)}")
        if mode == "abort":
            for rid in list(self.requests):
                self.abort(rid)
        elif mode == "retract":
            self._retract_running()
        self.paused = mode

    def _retract_running(self, keep_tokens: bool = False) -> None:
        """Take every request out of vLLM (its KV is dropped). A retraction restarts it from
        the tokens already sent; `keep_tokens` (after a weight swap) keeps all of them, and
        its KV is recomputed with the new weights when it is re-added."""
        running = [r for r in self.requests.values() if r not in self.held]
        if running:
            self.llm.abort_request([r.rid for r in running])
        for req in reversed(running):
            if not keep_tokens:
                req.restart()
            self.held.appendleft(req)
        if not keep_tokens:
            self.num_retracted += len(running)

    # ------------------------------------------------------------------ cache

    def flush_cache(self, empty_cache: bool = True) -> tuple[bool, str]:
        """Reset vLLM's prefix cache, only when no request is in flight."""
        waiting, running = self.counts()
        if waiting or running:
            return False, (
                f"cache not flushed: {waiting} waiting and {running} running requests in flight"
            )
        self._reset_prefix_cache()
        release_cuda_cache(self.device, empty_cache)
        return True, "cache flushed"

    def flush_kv(self, empty_cache: bool) -> None:
        """After a weight update: no KV of the old weights may be reused, so requests still
        inside vLLM (in_place pause) are taken out, keeping their tokens, and re-added (their
        KV recomputed with the new weights); the cache is reset."""
        self._retract_running(keep_tokens=True)
        self._reset_prefix_cache()
        release_cuda_cache(self.device, empty_cache)

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache")

    # ------------------------------------------------------------------ weights (engine_api)

    def live_weights(self) -> ModelWeights:
        return self.mirror

    def new_shadow(self) -> ModelWeights:
        return self.mirror.clone_empty()

    def stream_sink(self, store: ModelWeights) -> GroupLoader:
        """in_place: load whole fused groups into vLLM as buckets land (engine_cfg.load_chunk_mb
        at a time: each reload call costs ~30 ms on top of its bytes here, 0.03 GiB in 8
        buckets: 0.31 s loaded per bucket vs 0.13 s in one load at the commit)."""
        chunk = int(self.engine_cfg.load_chunk_mb * (1 << 20))
        self.streamed = GroupLoader(self.llm, store, chunk)
        return self.streamed

    def apply_weights(self, store: ModelWeights) -> None:  # type: ignore[override]
        """Load into vLLM whatever of `store` it does not hold yet: everything after a shadow
        update, the groups not streamed in during an in_place one."""
        streamed, self.streamed = self.streamed, None
        done = streamed.loaded if streamed is not None and streamed.store is store else set()
        views = store.hf_views()
        items = [(n, t) for n, t in views.items() if n not in done]
        _reload(self.llm, items, store.cfg.tie_word_embeddings)
        self.mirror = store

    def info(self) -> EngineInfo:
        """vLLM sizes its KV memory itself (VLLM_CPU_KVCACHE_SPACE): the pool fields stay 0."""
        return self._info(
            backend="vllm", retracted=self.num_retracted, disk_root=str(self.disk_receiver.root)
        )


class Serialized:
    """vLLM's LLMEngine is not thread-safe: the loop thread steps, aborts and resets it while
    an in_place update's worker thread loads groups into it. Every call takes one lock."""

    def __init__(self, target: Any):
        self._target, self._lock = target, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked


def _reload(llm: Any, items: list[tuple[str, torch.Tensor]], tied: bool) -> None:
    """vLLM's own reload path: handles its fused layers and its CPU weight packing.
    `tied`: the model ties its output head to the embedding (see `_with_tied_head`)."""
    if items:
        items = _with_tied_head(items) if tied else items
        llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(items), "is_checkpoint_format": True}
        )


def _with_tied_head(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A tied model's new embedding, also loaded as its output head.

    Why: on CPU vLLM computes the logits with its own packed copy of the head's weight (made
    by the head's quant method after loading, `dispatch_cpu_unquantized_gemm`). A reload
    re-packs only the layers that received weights; a tied checkpoint names no head, so the
    embedding's storage took the new bytes while the logits kept using the old packed head.
    Giving vLLM the embedding under the head's name too makes its reload re-pack the head (in
    vLLM 0.32 the reload un-ties the two while loading, so the name is not skipped as an alias;
    tests/e2e/test_vllm_backend.py checks the tokens)."""
    return items + [(TIED_HEAD, t) for n, t in items if n == EMBED]


def group_of(name: str) -> str:
    """The vLLM parameter a Hugging Face tensor is fused into (q/k/v -> qkv, gate/up ->
    gate_up); other tensors are their own group."""
    for part, fused in (
        ("q_proj", "qkv"),
        ("k_proj", "qkv"),
        ("v_proj", "qkv"),
        ("gate_proj", "gate_up"),
        ("up_proj", "gate_up"),
    ):
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}.")
    return name


class GroupLoader:
    """In-place updates into vLLM: after each bucket, loads the fused groups that are now
    complete (never part of one: vLLM silently corrupts a half-loaded fused parameter), so
    most of the load overlaps the transfer. Runs on the update's worker thread while the
    engine loop is not stepping vLLM (generation is refused until the update lands)."""

    def __init__(self, llm: Any, store: ModelWeights, min_bytes: int = 0):
        self.llm, self.store, self.views = llm, store, store.hf_views()
        self.min_bytes = min_bytes
        self.group = {name: group_of(name) for name in self.views}
        self.members: dict[str, list[str]] = {}
        for name, group in self.group.items():
            self.members.setdefault(group, []).append(name)
        self.missing = {group: set(names) for group, names in self.members.items()}
        self.ready: list[str] = []
        self.loaded: set[str] = set()

    def written(self, name: str) -> None:
        group = self.group[name]
        missing = self.missing[group]
        missing.discard(name)
        if not missing:
            missing.update(self.members[group])  # a tensor written again needs its group again
            self.ready.extend(self.members[group])

    def bucket_done(self) -> None:
        """Load the complete groups once they add up to `min_bytes` (the rest loads at the
        commit): each reload call has a fixed cost that small loads would not amortize."""
        ready = list(dict.fromkeys(self.ready))
        if sum(self.views[n].nbytes for n in ready) < max(self.min_bytes, 1):
            return
        self.ready = []
        items = [(n, self.views[n]) for n in ready]
        _reload(self.llm, items, self.store.cfg.tie_word_embeddings)
        self.loaded.update(ready)


def _build_llm(path: str | Path, cfg: EngineConfig, dtype: torch.dtype, max_len: int) -> Any:
    """vLLM's LLMEngine in this process (no engine-core process: our loop steps it)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(path),
        dtype=dtype_name(dtype),
        enforce_eager=True,
        enable_prefix_caching=True,
        max_model_len=max_len,
        skip_tokenizer_init=True,
        distributed_executor_backend="uni",
        max_num_seqs=cfg.max_running,
        block_size=BLOCK_SIZE,
        seed=0,
        logprobs_mode="processed_logprobs",  # of the distribution sampled from, as PPO needs
    )
    return LLMEngine.from_engine_args(args)
