"""Every message that crosses a process, as a typed dataclass.

This module only declares shapes and limits; `rlsync.codec` turns them into msgpack frames and
validates them on the way in. Field metadata carries the value ranges the codec enforces
(`ge`, `le`, `max_len`). Nothing here knows about sockets, torch or either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PauseMode = Literal["abort", "retract", "in_place"]
LoadMode = Literal["in_place", "shadow"]
FinishReason = Literal["length", "stop", "abort"]

MAX_TOKENS = 1 << 20
MAX_NAME = 512


def _f(default: Any = None, *, ge: float | None = None, le: float | None = None,
       max_len: int | None = None, factory: Any = None) -> Any:
    """A dataclass field with the limits the codec checks on decode."""
    meta = {k: v for k, v in (("ge", ge), ("le", le), ("max_len", max_len)) if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- bucket plan (nested values)

@dataclass(kw_only=True)
class TensorSpec:
    """One tensor inside a bucket: where its bytes start and how to view them."""

    name: str = _f(max_len=MAX_NAME)
    dtype: str = _f(max_len=32)
    shape: list[int] = _f(factory=list, max_len=8)
    offset: int = _f(0, ge=0)
    nbytes: int = _f(0, ge=0)


@dataclass(kw_only=True)
class Bucket:
    """A contiguous run of tensors sent as one buffer; `nbytes` is the aligned buffer size."""

    nbytes: int = _f(0, ge=0)
    tensors: list[TensorSpec] = _f(factory=list, max_len=1 << 16)


@dataclass(kw_only=True)
class BucketPlan:
    """How a set of named tensors is laid out in buckets; cached across steps."""

    alignment: int = _f(256, ge=1, le=1 << 20)
    buckets: list[Bucket] = _f(factory=list, max_len=1 << 16)


@dataclass(kw_only=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""

    max_new_tokens: int = _f(16, ge=1, le=MAX_TOKENS)
    temperature: float = _f(0.0, ge=0.0, le=100.0)
    top_p: float = _f(1.0, ge=0.0, le=1.0)
    top_k: int = _f(0, ge=0, le=MAX_TOKENS)
    """0 disables top-k."""
    seed: int | None = _f(None, ge=0, le=(1 << 63) - 1)
    stop_token_ids: list[int] = _f(factory=list, max_len=1024)


@dataclass(kw_only=True)
class IpcBuffer:
    """Where an IPC weight buffer lives. kind "shm": POSIX shared memory by name; kind "cuda":
    a CUDA IPC handle sent field by field (never pickled), keyed by the GPU's UUID."""

    kind: Literal["shm", "cuda"] = "shm"
    name: str = _f("", max_len=255)
    """shm: segment name holding the bucket slots."""
    control_name: str = _f("", max_len=255)
    """shm segment with the progress counters shared by the pusher and the engines."""
    nbytes: int = _f(0, ge=0)
    num_slots: int = _f(1, ge=1, le=1 << 16)
    slot_bytes: int = _f(0, ge=0)
    engine_index: int = _f(0, ge=0, le=4095)
    """Which consumed-counter in the control segment this engine advances."""
    gpu_uuid: str = _f("", max_len=64)
    cuda_handle: bytes = _f(b"", max_len=256)
    cuda_storage_offset: int = _f(0, ge=0)
    cuda_ref_counter_handle: bytes = _f(b"", max_len=256)
    cuda_ref_counter_offset: int = _f(0, ge=0)
    cuda_event_handle: bytes = _f(b"", max_len=256)
    cuda_event_sync_required: bool = False


# ---------------------------------------------------------------- messages


@dataclass(kw_only=True)
class Message:
    """Base of every wire message; `request_id` pairs a reply with its call."""

    request_id: str = _f("", max_len=128)


@dataclass(kw_only=True)
class Generate(Message):
    """Generate from one prompt; the reply is one GenerateOutput (several when stream)."""

    input_ids: list[int] = _f(factory=list, max_len=MAX_TOKENS)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


@dataclass(kw_only=True)
class GenerateOutput(Message):
    """Tokens for a Generate. With stream, `output_ids`/`logprobs` are the new tokens only."""

    output_ids: list[int] = _f(factory=list, max_len=MAX_TOKENS)
    logprobs: list[float] = _f(factory=list, max_len=MAX_TOKENS)
    finished: bool = True
    finish_reason: FinishReason | None = None
    prompt_tokens: int = _f(0, ge=0)
    cached_tokens: int = _f(0, ge=0)
    """Prompt tokens served from the prefix cache."""
    weight_version: int = _f(0, ge=0)
    """Version of the weights that produced the latest token."""
    min_weight_version: int = _f(0, ge=0)
    """Oldest version that produced any token of this output (== weight_version unless an
    in_place pause let a weight update land mid-request)."""
    error: str = _f("", max_len=4096)


@dataclass(kw_only=True)
class Abort(Message):
    target_id: str = _f("", max_len=128)


@dataclass(kw_only=True)
class InitWeightsGroup(Message):
    """Join a dedicated broadcast group: trainer is rank 0, this engine is rank_offset."""

    master_address: str = _f("127.0.0.1", max_len=255)
    master_port: int = _f(0, ge=1, le=65535)
    rank_offset: int = _f(1, ge=1, le=4095)
    world_size: int = _f(2, ge=2, le=4096)
    group_name: str = _f("weights", max_len=128)
    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: float = _f(60.0, ge=0.1, le=3600.0)


@dataclass(kw_only=True)
class DestroyWeightsGroup(Message):
    group_name: str = _f("weights", max_len=128)


@dataclass(kw_only=True)
class _UpdateWeights(Message):
    """Fields common to every weight update."""

    weight_version: int = _f(0, ge=0)
    flush_cache: bool = True
    torch_empty_cache: bool = False
    """Call torch.cuda.empty_cache() in the flush; off by default because it syncs every
    CUDA stream and stalls concurrent inference (SGLang PR #22998)."""
    load_mode: LoadMode = "in_place"
    pause_mode: PauseMode | None = None
    """What to do with in-flight requests; None waits for idle up to idle_timeout_s."""
    idle_timeout_s: float = _f(30.0, ge=0.0, le=3600.0)
    timeout_s: float = _f(60.0, ge=0.1, le=3600.0)
    """Bound on every receive of this update."""
    verify: bool = False
    """Check every bucket's fingerprint on arrival."""


@dataclass(kw_only=True)
class UpdateWeightsFromDistributed(_UpdateWeights):
    group_name: str = _f("weights", max_len=128)
    plan: BucketPlan = field(default_factory=BucketPlan)


@dataclass(kw_only=True)
class UpdateWeightsFromIPC(_UpdateWeights):
    buffer: IpcBuffer = field(default_factory=IpcBuffer)
    plan: BucketPlan = field(default_factory=BucketPlan)
    push_id: int = _f(0, ge=0)
    """Sequence number of this push in the control segment (guards against stale counters)."""


@dataclass(kw_only=True)
class UpdateWeightsFromDisk(_UpdateWeights):
    path: str = _f("", max_len=4096)


@dataclass(kw_only=True)
class FlushCache(Message):
    empty_cache: bool = True


@dataclass(kw_only=True)
class PauseGeneration(Message):
    mode: PauseMode = "abort"


@dataclass(kw_only=True)
class ContinueGeneration(Message):
    pass


@dataclass(kw_only=True)
class GetWeightsFingerprint(Message):
    names: list[str] | None = _f(None, max_len=1 << 16)
    """None: every tensor."""


@dataclass(kw_only=True)
class GetInfo(Message):
    pass


@dataclass(kw_only=True)
class Shutdown(Message):
    pass


@dataclass(kw_only=True)
class Result(Message):
    """The one reply to every control call. `payload` holds msgpack-native values only."""

    success: bool = True
    message: str = _f("", max_len=1 << 16)
    payload: dict[str, Any] = _f(factory=dict, max_len=1 << 16)


CONTROL_MESSAGES: tuple[type[Message], ...] = (
    Abort, InitWeightsGroup, DestroyWeightsGroup, UpdateWeightsFromDistributed,
    UpdateWeightsFromIPC, UpdateWeightsFromDisk, FlushCache, PauseGeneration,
    ContinueGeneration, GetWeightsFingerprint, GetInfo, Shutdown,
)
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (Generate, GenerateOutput, Result, *CONTROL_MESSAGES)
}
UPDATE_MESSAGES = (UpdateWeightsFromDistributed, UpdateWeightsFromIPC, UpdateWeightsFromDisk)
