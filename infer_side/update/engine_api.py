"""The narrow interface between the weight-update machine and an engine backend.

`infer_side.update.update_machine.UpdateMachine` drives a weight update through these methods only;
every engine backend implements them (`EngineCore` for our own engine, `VllmCore` for
vLLM). The machine owns the gating state (weights incomplete, admission held, the pending
version) and the backend asks it; the backend owns its weights, scheduler and KV.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch

from rlsync.transports.base import WriteSink
from rlsync.wire.protocol import PauseMode, StoreRef


class EngineWeights(Protocol):
    """One store of an engine's weights, addressed by Hugging Face names."""

    def expected(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype name, shape) of every tensor an update must carry."""
        ...

    def validate(
        self, items: Iterable[tuple[str, Any, Iterable[int]]], complete: bool = True
    ) -> None:
        """Raise naming the tensor when (name, dtype, shape) items do not fit."""
        ...

    def hf_views(self) -> Mapping[str, torch.Tensor]:
        """Writable views of the store's bytes, by Hugging Face name."""
        ...

    def fingerprints(self, names: Iterable[str] | None = None) -> dict[str, int]: ...

    @property
    def flat(self) -> torch.Tensor | None:
        """The one flat buffer every tensor is a view of (None: no such buffer); an update
        whose plan follows the store lands its buckets here in place."""
        ...

    @property
    def store_ref(self) -> StoreRef | None:
        """Where a pusher can map `flat` to write it directly (None: it cannot)."""
        ...

    def placement(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, nbytes) in `flat` (only called when `flat` is set)."""
        ...

    def layout(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (byte offset, element strides) in `flat` (only when `flat` is set)."""
        ...

    def close(self) -> None:
        """Release the store's shared name, if any (views keep the memory alive)."""
        ...


class UpdatableEngine(Protocol):
    """What the update machine needs from an engine backend."""

    weight_version: int
    """The version every new token is produced with; the machine sets it on commit."""

    def live_weights(self) -> EngineWeights: ...

    def new_shadow(self) -> EngineWeights:
        """A second store with the live one's layout, for shadow updates."""
        ...

    def apply_weights(self, store: EngineWeights) -> None:
        """Compute with the bytes now in `store` from the next step on: the shadow store after
        a shadow update (it becomes the live one), or the live store after an in_place update
        (a backend whose live store is a staging copy loads it into its model here)."""
        ...

    def stream_sink(self, store: EngineWeights) -> WriteSink | None:
        """For an in_place update into `store`: what to tell as tensors and buckets land (a
        backend that copies the store into its model loads it as bytes arrive), or None
        when the store is the model's own memory."""
        ...

    def pause(self, mode: PauseMode) -> None: ...
    def continue_generation(self) -> None: ...
    def paused_mode(self) -> PauseMode | None: ...

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests."""
        ...

    def is_idle(self) -> bool:
        """No request holds KV or may be admitted."""
        ...

    def flush_kv(self, empty_cache: bool) -> None:
        """No KV computed with the old weights may be reused after this; call
        torch.cuda.empty_cache() only when `empty_cache` (SGLang PR #22998)."""
        ...
