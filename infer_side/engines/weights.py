"""The engine's live weights: fused tensors, allocated once, loaded by Hugging Face name.

The model computes with fused projections (one QKV matmul, one gate+up matmul), while every
weight push names tensors the Hugging Face way. `ModelWeights` holds the fused storage and
hands out zero-copy HF-named views into it, so a load is `view.copy_(src)` and a
fingerprint per HF name reads the live bytes. It knows nothing about attention, the KV
pool, transports or checkpoint files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from rlsync.model_config import ModelConfig
from rlsync.plan.buckets import align_up, dtype_name, tensor_fingerprint
from rlsync.transports.store import EngineStore
from rlsync.wire.protocol import StoreRef

STORE_ALIGNMENT = 256


class WeightError(ValueError):
    """A weight update that does not fit this model; the message names the tensor."""


@dataclass
class LayerWeights:
    """One decoder layer's fused tensors (rows of qkv: q, then k, then v; of gate_up: gate, up)."""

    input_layernorm: torch.Tensor
    qkv_proj: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor


class ModelWeights:
    """Fused weight storage plus its Hugging Face-named views.

    Why a class of its own: the engine keeps two of these (live and shadow) and swaps them
    between steps, validates a whole update against `expected()` before touching a byte, and
    fingerprints per HF name, all without knowing how the model uses the tensors.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        embed_tokens: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor | None,
        store: EngineStore | None = None,
    ):
        """`store`: the one flat buffer every tensor above is a view of (see `empty`)."""
        self.cfg, self.dtype, self.device = cfg, dtype, embed_tokens.device
        self.store = store
        self.embed_tokens, self.layers, self.norm, self.lm_head = (
            embed_tokens,
            layers,
            norm,
            lm_head,
        )
        self._views = self._make_views()
        self._expected = {n: (dtype_name(dtype), tuple(v.shape)) for n, v in self._views.items()}
        assert self._expected.keys() == cfg.hf_parameter_shapes().keys()
        assert all(s == cfg.hf_parameter_shapes()[n] for n, (_, s) in self._expected.items())

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        *,
        exposed: bool = False,
    ) -> ModelWeights:
        """Allocate zeroed storage for `cfg` (dtype defaults to the config's): one flat buffer
        holding every fused tensor at a `STORE_ALIGNMENT`-aligned offset, so each Hugging
        Face tensor (a row range of a fused one too) is one contiguous byte range. With
        `exposed`, the buffer is memory a pusher can map and write (`EngineStore`).

        Always normal tensors, even when called under inference_mode, so any thread may
        later write the views in place.
        """
        dtype = dtype or cfg.dtype
        shapes = _fused_shapes(cfg)
        offsets, end = {}, 0
        for name, shape in shapes.items():
            offsets[name] = end
            end = align_up(end + math.prod(shape) * dtype.itemsize, STORE_ALIGNMENT)
        store = EngineStore(end, device, exposed=exposed)

        def carve(name: str) -> torch.Tensor:
            shape, start = shapes[name], offsets[name]
            nbytes = math.prod(shape) * dtype.itemsize
            return store.flat[start : start + nbytes].view(dtype).view(shape)

        def layer(n: int) -> LayerWeights:
            p = f"model.layers.{n}."
            return LayerWeights(
                input_layernorm=carve(p + "input_layernorm.weight"),
                qkv_proj=carve(p + "self_attn.qkv_proj.weight"),
                qkv_bias=carve(p + "self_attn.qkv_proj.bias") if cfg.attention_bias else None,
                o_proj=carve(p + "self_attn.o_proj.weight"),
                post_attention_layernorm=carve(p + "post_attention_layernorm.weight"),
                gate_up_proj=carve(p + "mlp.gate_up_proj.weight"),
                down_proj=carve(p + "mlp.down_proj.weight"),
            )

        with torch.inference_mode(False):
            layers = [layer(n) for n in range(cfg.num_hidden_layers)]
            lm_head = None if cfg.tie_word_embeddings else carve("lm_head.weight")
            embed, norm = carve("model.embed_tokens.weight"), carve("model.norm.weight")
        return cls(cfg, dtype, embed, layers, norm, lm_head, store)

    # ------------------------------------------------------------------ views and names

    def _make_views(self) -> dict[str, torch.Tensor]:
        q, kv, i = self.cfg.q_size, self.cfg.kv_size, self.cfg.intermediate_size
        views = {"model.embed_tokens.weight": self.embed_tokens}
        for n, layer in enumerate(self.layers):
            p = f"model.layers.{n}."
            qkv, gate_up = layer.qkv_proj, layer.gate_up_proj
            views.update(
                {
                    p + "input_layernorm.weight": layer.input_layernorm,
                    p + "self_attn.q_proj.weight": qkv[:q],
                    p + "self_attn.k_proj.weight": qkv[q : q + kv],
                    p + "self_attn.v_proj.weight": qkv[q + kv :],
                    p + "self_attn.o_proj.weight": layer.o_proj,
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm,
                    p + "mlp.gate_proj.weight": gate_up[:i],
                    p + "mlp.up_proj.weight": gate_up[i:],
                    p + "mlp.down_proj.weight": layer.down_proj,
                }
            )
            if layer.qkv_bias is not None:
                bias = layer.qkv_bias
                views.update(
                    {
                        p + "self_attn.q_proj.bias": bias[:q],
                        p + "self_attn.k_proj.bias": bias[q : q + kv],
                        p + "self_attn.v_proj.bias": bias[q + kv :],
                    }
                )
        views["model.norm.weight"] = self.norm
        if self.lm_head is not None:
            views["lm_head.weight"] = self.lm_head
        return views

    def hf_views(self) -> dict[str, torch.Tensor]:
        """HF name -> zero-copy view into the fused storage (writing a view writes the model)."""
        return dict(self._views)

    def fused(self) -> dict[str, torch.Tensor]:
        """The storage itself, under the engine's fused names (one entry per real tensor)."""
        out = {"model.embed_tokens.weight": self.embed_tokens}
        for n, layer in enumerate(self.layers):
            p = f"model.layers.{n}."
            out.update(
                {
                    p + "input_layernorm.weight": layer.input_layernorm,
                    p + "self_attn.qkv_proj.weight": layer.qkv_proj,
                    p + "self_attn.o_proj.weight": layer.o_proj,
                    p + "post_attention_layernorm.weight": layer.post_attention_layernorm,
                    p + "mlp.gate_up_proj.weight": layer.gate_up_proj,
                    p + "mlp.down_proj.weight": layer.down_proj,
                }
            )
            if layer.qkv_bias is not None:
                out[p + "self_attn.qkv_proj.bias"] = layer.qkv_bias
        out["model.norm.weight"] = self.norm
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        return out

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection: lm_head, or the embedding when tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fused().values())

    def expected(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """HF name -> (dtype name, shape) that a load must match exactly."""
        return dict(self._expected)

    # ------------------------------------------------------------------ validate and load

    def validate(
        self, items: Iterable[tuple[str, str | torch.dtype, Iterable[int]]], complete: bool = True
    ) -> None:
        """Check (name, dtype, shape) items against `expected()`; raise WeightError naming the
        first bad tensor. With `complete`, every expected name must appear exactly once."""
        seen: set[str] = set()
        for name, dtype, shape in items:
            self._validate_one(name, dtype, tuple(shape), seen)
            seen.add(name)
        if complete and len(seen) != len(self._expected):
            missing = [n for n in self._expected if n not in seen]
            raise WeightError(
                f"{missing[0]}: missing from the update ({len(missing)} missing: {missing[:4]})"
            )

    def _validate_one(
        self, name: str, dtype: str | torch.dtype, shape: tuple, seen: set[str]
    ) -> None:
        if name not in self._expected:
            raise WeightError(f"{name!r}: unknown tensor name for this model")
        if name in seen:
            raise WeightError(f"{name}: appears twice in the update")
        want_dtype, want_shape = self._expected[name]
        got_dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if got_dtype != want_dtype:
            raise WeightError(f"{name}: dtype {got_dtype}, expected {want_dtype}")
        if shape != want_shape:
            raise WeightError(f"{name}: shape {list(shape)}, expected {list(want_shape)}")

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], complete: bool = True) -> int:
        """Validate every tensor first, then copy them in; a bad input changes no weight.

        Source dtype must equal the store's (a push never casts silently); sources may live
        on any device. Returns how many tensors were copied.
        """
        items = list(named_tensors)
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise WeightError(f"{name!r}: expected a torch.Tensor, got {type(t).__name__}")
        self.validate([(n, t.dtype, t.shape) for n, t in items], complete=complete)
        with torch.inference_mode():
            for name, t in items:
                self._views[name].copy_(t)
        return len(items)

    def clone_empty(self) -> ModelWeights:
        """A second, zeroed store of the same config, dtype, device and layout (for shadow
        updates), exposed if this one is."""
        exposed = self.store is not None and self.store.ref is not None
        return ModelWeights.empty(self.cfg, self.dtype, self.device, exposed=exposed)

    # ------------------------------------------------------------------ the flat store

    @property
    def store_ref(self) -> StoreRef | None:
        """Where a pusher can map this store (None: private memory)."""
        return self.store.ref if self.store is not None else None

    @property
    def flat(self) -> torch.Tensor | None:
        """The flat uint8 buffer every tensor is a view of."""
        return self.store.flat if self.store is not None else None

    def layout(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """HF name -> (byte offset in the flat store, element strides)."""
        assert self.store is not None
        base = self.store.flat.data_ptr()
        return {n: (v.data_ptr() - base, tuple(v.stride())) for n, v in self._views.items()}

    def placement(self) -> dict[str, tuple[int, int]]:
        """HF name -> (byte offset, nbytes) in the flat store: what an in-store plan must
        match byte for byte (`rlsync.plan.buckets.validate_placement`)."""
        return {
            n: (off, self._views[n].numel() * self.dtype.itemsize)
            for n, (off, _) in self.layout().items()
        }

    def close(self) -> None:
        """Release an exposed store's name (its pages go when the last view does)."""
        if self.store is not None:
            self.store.close()

    def copy_from(self, other: ModelWeights) -> None:
        """Copy every weight of `other` (same layout and dtype) into this store."""
        if other.expected() != self._expected:
            raise WeightError("copy_from: the other store has a different layout or dtype")
        mine, theirs = self.fused(), other.fused()
        with torch.inference_mode():
            for name, t in mine.items():
                t.copy_(theirs[name])

    def fingerprints(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """HF name -> 64-bit fingerprint of that tensor's live bytes."""
        names = list(self._views) if names is None else list(names)
        for name in names:
            if name not in self._views:
                raise WeightError(f"{name!r}: unknown tensor name for this model")
        return {n: tensor_fingerprint(self._views[n]) for n in names}


def _fused_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The engine's fused tensors, in the order they sit in the flat store."""
    h, i, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = (qkv, h)
        if cfg.attention_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = (qkv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
