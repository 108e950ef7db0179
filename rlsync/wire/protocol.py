"""Every message that crosses a process, as a typed dataclass.

This module only declares shapes and limits; `rlsync.wire.codec` turns them into msgpack frames and
validates them on the way in. Field metadata carries the value ranges the codec enforces
(`ge`, `le`, `max_len`). Nothing here knows about sockets, torch or either side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

PauseMode = Literal["abort", "retract", "in_place"]
LoadMode = Literal["in_place", "shadow"]
TransportKind = Literal["broadcast", "ipc", "disk"]
FinishReason = Literal["length", "stop", "abort"]
CommitMode = Literal["independent", "atomic"]
PAUSE_MODES: tuple[str, ...] = get_args(PauseMode)
LOAD_MODES: tuple[str, ...] = get_args(LoadMode)
TRANSPORT_KINDS: tuple[str, ...] = get_args(TransportKind)
COMMIT_MODES: tuple[str, ...] = get_args(CommitMode)

WEIGHTS_INCOMPLETE = "weights incomplete"
"""How the `error` of a Generate refused during an in_place update's write begins. Nothing of
the request ran, so it may be sent again once the update lands."""

MAX_TOKENS = 1 << 20
MAX_NAME = 512


def _f(
    default: Any = None,
    *,
    ge: float | None = None,
    le: float | None = None,
    max_len: int | None = None,
    factory: Any = None,
) -> Any:
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
    store_offset: int | None = _f(None, ge=0)
    """Set when the plan follows the engine's weight layout: the bucket is the byte range
    [store_offset, store_offset + nbytes) of the engine's store, written there in place."""


@dataclass(kw_only=True)
class BucketPlan:
    """How a set of named tensors is laid out in buckets; cached across steps."""

    alignment: int = _f(256, ge=1, le=1 << 20)
    buckets: list[Bucket] = _f(factory=list, max_len=1 << 16)


@dataclass(kw_only=True)
class DeltaInfo:
    """An update whose buckets arrive as delta payloads (`rlsync.plan.delta`, docs/PROTOCOL.md)."""

    base_version: int | None = _f(None, ge=0)
    """The version the payloads are encoded against; the engine must serve exactly it. None:
    every payload is a whole bucket (a full push that also sets the pusher's base)."""
    plan_id: str = _f("", max_len=64)
    """Disk updates only (they carry no plan of their own): the payloads' plan, by id."""
    plan: BucketPlan | None = None
    """Disk updates only: the plan itself, or nil when the engine holds `plan_id`."""


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
class CudaShare:
    """CUDA memory exported by IPC handle, field by field (never pickled): what
    `UntypedStorage._share_cuda_` returns, with the GPU named by UUID so a process with a
    different CUDA_VISIBLE_DEVICES finds its own index for it."""

    gpu_uuid: str = _f("", max_len=64)
    handle: bytes = _f(b"", max_len=256)
    storage_offset: int = _f(0, ge=0)
    ref_counter_handle: bytes = _f(b"", max_len=256)
    ref_counter_offset: int = _f(0, ge=0)
    event_handle: bytes = _f(b"", max_len=256)
    event_sync_required: bool = False


@dataclass(kw_only=True)
class IpcBuffer:
    """Where an IPC weight buffer lives. kind "shm": POSIX shared memory by name; kind "cuda":
    CUDA memory shared by IPC handle (`cuda`)."""

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
    cuda: CudaShare | None = None


@dataclass(kw_only=True)
class StoreRef:
    """One of an engine's weight stores, mapped by a pusher that writes it directly: a POSIX
    shm segment the engine created (kind "shm") or engine GPU memory (kind "cuda")."""

    kind: Literal["shm", "cuda"] = "shm"
    name: str = _f("", max_len=255)
    nbytes: int = _f(0, ge=0)
    cuda: CudaShare | None = None


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
class VersionSpan:
    """`tokens` consecutive output tokens produced by weight version `version`."""

    version: int = _f(0, ge=0)
    tokens: int = _f(1, ge=1, le=MAX_TOKENS)


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
    version_spans: list[VersionSpan] = _f(factory=list, max_len=MAX_TOKENS)
    """Which version produced which of `output_ids`: spans in order, their `tokens` summing
    to len(output_ids) (a stream chunk: its own tokens only)."""
    error: str = _f("", max_len=4096)


@dataclass(kw_only=True)
class Abort(Message):
    target_id: str = _f("", max_len=128)


@dataclass(kw_only=True)
class InitWeightsGroup(Message):
    """Join a dedicated broadcast group: trainer is rank 0, this engine is rank_offset.

    `senders` > 1 (a sharded trainer): one group of `world_size` ranks per trainer rank r,
    named `<group_name>/s<r>`, where trainer rank r is rank 0 and this engine rank_offset;
    the `senders - 1 + world_size` processes meet at one store, served by trainer rank 0."""

    master_address: str = _f("127.0.0.1", max_len=255)
    master_port: int = _f(0, ge=1, le=65535)
    rank_offset: int = _f(1, ge=1, le=4095)
    world_size: int = _f(2, ge=2, le=4096)
    group_name: str = _f("weights", max_len=128)
    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: float = _f(60.0, ge=0.1, le=3600.0)
    senders: int = _f(1, ge=1, le=1024)


@dataclass(kw_only=True)
class DestroyWeightsGroup(Message):
    group_name: str = _f("weights", max_len=128)


@dataclass(kw_only=True)
class UpdateWeights(Message):
    """Fields common to every weight update. The engine answers UpdateAccepted (or an
    UpdateDone with success=False that changed nothing), then UpdateDone."""

    transport: ClassVar[TransportKind]
    """Which transport moves this update's bytes (the registry key in rlsync.transports)."""
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
    delta: DeltaInfo | None = None
    """Set: the bytes arrive delta-encoded against `delta.base_version` (`rlsync.plan.delta`)."""
    commit: CommitMode = "independent"
    """independent: switch as soon as the bytes are in. atomic (shadow only): answer
    UpdateReady once the bytes are in the shadow, then switch on CommitUpdate, discard on
    AbortUpdate, or discard on its own `commit_timeout_s` after UpdateReady."""
    commit_timeout_s: float = _f(60.0, ge=0.1, le=3600.0)
    """atomic: how long an engine holds a ready update waiting for CommitUpdate/AbortUpdate."""


@dataclass(kw_only=True)
class BucketUpdate(UpdateWeights):
    """An update whose bytes arrive as the buckets of a plan. The plan is sent once: the
    engine keeps validated plans by `plan_id` (`plan_id_of`), so later updates may carry only
    the id; an engine that does not know the id refuses with `unknown_plan=True`."""

    plan_id: str = _f("", max_len=64)
    plan: BucketPlan | None = None


@dataclass(kw_only=True)
class UpdateWeightsFromDistributed(BucketUpdate):
    transport: ClassVar[TransportKind] = "broadcast"
    group_name: str = _f("weights", max_len=128)
    rows: dict[str, list[int]] | None = _f(None, max_len=1 << 16)
    """A sharded group's update: tensor name -> its dim-0 row boundaries, one more than the
    group has senders; sender r sends rows [rows[r], rows[r + 1]) of every tensor
    (`rlsync.transports.sharded.broadcast_rows`). None: one sender sends everything."""


@dataclass(kw_only=True)
class UpdateWeightsFromIPC(BucketUpdate):
    transport: ClassVar[TransportKind] = "ipc"
    buffer: IpcBuffer = field(default_factory=IpcBuffer)
    push_id: int = _f(0, ge=0)
    """Sequence number of this push in the control segment (guards against stale counters)."""


@dataclass(kw_only=True)
class UpdateWeightsFromDisk(UpdateWeights):
    transport: ClassVar[TransportKind] = "disk"
    path: str = _f("", max_len=4096)


@dataclass(kw_only=True)
class CommitUpdate(Message):
    """Switch to the ready atomic update of `weight_version` now. Answered by a Result; the
    update's own UpdateDone follows."""

    weight_version: int = _f(0, ge=0)


@dataclass(kw_only=True)
class AbortUpdate(Message):
    """Discard the update of `weight_version` still in flight (the old version keeps
    serving). Answered by a Result; the update's own UpdateDone follows."""

    weight_version: int = _f(0, ge=0)


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
    """Answered by WeightFingerprints."""

    names: list[str] | None = _f(None, max_len=1 << 16)
    """None: every tensor."""


@dataclass(kw_only=True)
class GetWeightSpecs(Message):
    """Answered by WeightSpecs: what an update must match."""


@dataclass(kw_only=True)
class GetInfo(Message):
    """Answered by EngineInfo."""


@dataclass(kw_only=True)
class Shutdown(Message):
    pass


# ---------------------------------------------------------------- replies


@dataclass(kw_only=True)
class Result(Message):
    """The reply to a control call that returns nothing but success or failure."""

    success: bool = True
    message: str = _f("", max_len=1 << 16)


@dataclass(kw_only=True)
class EngineDied(Message):
    """The engine crashed (or shut down) before answering this request; clients raise."""

    message: str = _f("", max_len=1 << 16)


@dataclass(kw_only=True)
class UpdateAccepted(Message):
    """Interim reply to an UpdateWeights*: the whole update was validated, bytes may flow."""

    weight_version: int = _f(0, ge=0)
    bytes: int = _f(0, ge=0)
    store: StoreRef | None = None
    """Set for a direct (one-copy) ipc update: the store the pusher writes this update into
    (the shadow store, or the live one for in_place)."""


@dataclass(kw_only=True)
class UpdateReady(Message):
    """Interim reply to an atomic update: every byte is in the shadow store (checked when
    `verify`) and the engine can switch at once on CommitUpdate."""

    weight_version: int = _f(0, ge=0)
    bytes: int = _f(0, ge=0)


@dataclass(kw_only=True)
class UpdateTimings:
    """Where one update's time went on the engine."""

    total_s: float = _f(0.0, ge=0.0)
    """From the request's arrival to the reply."""
    recv_s: float = _f(0.0, ge=0.0)
    """Waiting for bytes (the receive minus the loads)."""
    load_s: float = _f(0.0, ge=0.0)
    """Copying received bytes into the weights."""
    flush_s: float = _f(0.0, ge=0.0)
    """Swap + KV flush + version bump."""
    pause_ms: float = _f(0.0, ge=0.0)
    """How long generation stood still for this update."""


@dataclass(kw_only=True)
class UpdateDone(Message):
    """Final reply to an UpdateWeights*: success, or why not and what it left behind."""

    success: bool = True
    message: str = _f("", max_len=1 << 16)
    weight_version: int = _f(0, ge=0)
    """The version the engine serves after this update (the old one when it failed)."""
    bytes: int = _f(0, ge=0)
    transport: TransportKind | None = None
    timings: UpdateTimings = field(default_factory=UpdateTimings)
    live_touched: bool = False
    """An in_place update wrote into the live weights before it failed."""
    weights_incomplete: bool = False
    """Generation is refused until a whole update lands."""
    unknown_plan: bool = False
    """Refused because the engine does not know `plan_id`: send the full plan again."""
    committed_at: float = _f(0.0, ge=0.0)
    """Wall-clock time (Unix seconds) the engine switched to this version; 0 if it did not."""


@dataclass(kw_only=True)
class WeightSpec:
    """One tensor an update must carry, by its Hugging Face name."""

    name: str = _f(max_len=MAX_NAME)
    dtype: str = _f(max_len=32)
    shape: list[int] = _f(factory=list, max_len=8)
    offset: int | None = _f(None, ge=0)
    """Byte offset of the tensor in each of the engine's stores (None: no exposed layout)."""
    strides: list[int] = _f(factory=list, max_len=8)
    """Element strides of the tensor in the store (row-major: contiguous bytes)."""


@dataclass(kw_only=True)
class WeightSpecs(Message):
    """What an update must carry and, for an engine whose stores can be written in place,
    where every byte goes (`store_bytes` > 0: each store is one flat buffer of that size)."""

    specs: list[WeightSpec] = _f(factory=list, max_len=1 << 16)
    weight_version: int = _f(0, ge=0)
    store_bytes: int = _f(0, ge=0)


@dataclass(kw_only=True)
class WeightFingerprints(Message):
    weight_version: int = _f(0, ge=0)
    fingerprints: dict[str, int] = _f(factory=dict, max_len=1 << 16)
    weights_incomplete: bool = False
    update_in_progress: bool = False


@dataclass(kw_only=True)
class EngineInfo(Message):
    """A snapshot of the engine's state."""

    weight_version: int = _f(0, ge=0)
    model: dict[str, Any] = _f(factory=dict, max_len=256)
    """The model's config (rlsync.model_config.ModelConfig fields)."""
    backend: str = _f("rlsync", max_len=64)
    kv_pool_size: int = _f(0, ge=0)
    kv_pool_used: int = _f(0, ge=0)
    prefix_cache_tokens: int = _f(0, ge=0)
    waiting: int = _f(0, ge=0)
    running: int = _f(0, ge=0)
    paused: PauseMode | None = None
    weights_incomplete: bool = False
    admission_held: bool = False
    retracted: int = _f(0, ge=0)
    disk_root: str = _f("", max_len=4096)
    """The directory a disk update's path must resolve under (docs/PROTOCOL.md, Disk root)."""


UPDATE_MESSAGES: dict[str, type[UpdateWeights]] = {
    cls.transport: cls
    for cls in (UpdateWeightsFromDistributed, UpdateWeightsFromIPC, UpdateWeightsFromDisk)
}
"""Transport kind -> its update message."""
CONTROL_MESSAGES: tuple[type[Message], ...] = (
    Abort,
    InitWeightsGroup,
    DestroyWeightsGroup,
    *UPDATE_MESSAGES.values(),
    CommitUpdate,
    AbortUpdate,
    FlushCache,
    PauseGeneration,
    ContinueGeneration,
    GetWeightsFingerprint,
    GetWeightSpecs,
    GetInfo,
    Shutdown,
)
REPLY_MESSAGES: tuple[type[Message], ...] = (
    GenerateOutput,
    Result,
    EngineDied,
    UpdateAccepted,
    UpdateReady,
    UpdateDone,
    WeightSpecs,
    WeightFingerprints,
    EngineInfo,
)
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (Generate, *CONTROL_MESSAGES, *REPLY_MESSAGES)
}
assert set(UPDATE_MESSAGES) == set(TRANSPORT_KINDS)


def is_final(msg: Message) -> bool:
    """True for the last reply a request gets: anything but an unfinished GenerateOutput, an
    UpdateAccepted or an UpdateReady (weight updates answer accepted, [ready,] then done)."""
    if isinstance(msg, GenerateOutput):
        return msg.finished
    return not isinstance(msg, (UpdateAccepted, UpdateReady))


def failed(msg: Message) -> str | None:
    """The failure a reply reports (its message), or None when it reports success."""
    if isinstance(msg, (Result, UpdateDone)):
        return None if msg.success else msg.message
    if isinstance(msg, EngineDied):
        return msg.message
    if isinstance(msg, GenerateOutput):
        return msg.error or None
    return None


def version_spans(versions: list[int]) -> list[VersionSpan]:
    """Run-length form of per-token weight versions: [3, 3, 4] -> (3, 2 tokens), (4, 1)."""
    spans: list[VersionSpan] = []
    for v in versions:
        if spans and spans[-1].version == v:
            spans[-1].tokens += 1
        else:
            spans.append(VersionSpan(version=v, tokens=1))
    return spans


def token_versions(spans: list[VersionSpan]) -> list[int]:
    """Per-token weight versions of a GenerateOutput (the inverse of `version_spans`)."""
    return [s.version for s in spans for _ in range(s.tokens)]


def plan_id_of(plan: BucketPlan) -> str:
    """A content hash of `plan`: equal plans get equal ids in every process."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{plan.alignment};".encode())
    for bucket in plan.buckets:
        placed = "" if bucket.store_offset is None else f"@{bucket.store_offset}"
        h.update(f"B{bucket.nbytes}{placed};".encode())
        for t in bucket.tensors:
            h.update(f"{t.name}|{t.dtype}|{t.shape}|{t.offset}|{t.nbytes};".encode())
    return h.hexdigest()
