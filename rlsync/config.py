"""Library config: how weights move (`SyncConfig`) and one inference engine (`EngineConfig`).

Nested dataclasses built from plain mappings by `build`: every value is checked against its
annotation by the one validator the wire codec uses too (`rlsync.wire.annotations`), and every
error names the dotted key ("sync.timeout_s: expected float, got 'fast'"). Nothing here reads YAML, the environment or the command line; the RL application
(`rlsync.app.run_config`) loads files and overrides on top of this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rlsync.model_config import ModelConfigError
from rlsync.wire import annotations
from rlsync.wire.protocol import CommitMode, LoadMode, PauseMode, TransportKind

COMMIT_MARGIN_S = 1.0
"""An atomic push sends its commit only while more than this is left of commit_timeout_s
(counted from its announcement), so the commit reaches every engine before it gives up."""


class ConfigError(ValueError):
    """A config key that is unknown or has a bad value; the message names the key."""


@dataclass(kw_only=True)
class EngineConfig:
    """One inference engine."""

    backend: Literal["rlsync", "vllm"] = "rlsync"
    """rlsync: our own engine; vllm: a real vLLM engine behind the same protocol."""
    load_chunk_mb: float = 256.0
    """vllm backend, in_place updates: load complete fused groups into vLLM as buckets land,
    once this many MB are ready (each vLLM reload call has a fixed cost); 0: every bucket."""
    expose_weights: bool = True
    """Our engine: keep the weight stores in memory a pusher can map (shm on CPU, IPC-able
    GPU memory), so ipc pushes write each byte once and broadcast receives land in place;
    False: private memory and the staging path. The vllm backend always stages."""
    kv_tokens: int = 4096
    """KV pool size in tokens, allocated once at start."""
    max_running: int = 64
    """Most requests decoded together in one step."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens prefilled in one step."""
    device: str = "cpu"
    dtype: str | None = None
    """Weights dtype; None keeps the model config's torch_dtype."""
    endpoint: str | None = None
    """ZMQ endpoint; None: ipc:// in a private (0700) directory."""
    start_timeout_s: float = 120.0
    call_timeout_s: float = 120.0
    disk_root: str | None = None
    """Disk updates load only from paths that resolve (realpath) under this directory; None:
    the system temp directory, where pushers make their work directories by default
    (`rlsync run` passes the run directory). See docs/PROTOCOL.md, Disk root."""

    def __post_init__(self) -> None:
        if self.disk_root == "":
            raise ConfigError("engine.disk_root: must be a directory, got ''")
        if self.load_chunk_mb < 0:
            raise ConfigError(f"engine.load_chunk_mb: must be >= 0, got {self.load_chunk_mb}")
        positive(
            self,
            "kv_tokens",
            "max_running",
            "max_prefill_tokens",
            "start_timeout_s",
            "call_timeout_s",
        )


@dataclass(kw_only=True)
class SyncConfig:
    """How weights move from trainer rank 0 to the engines after each step."""

    transport: TransportKind = "ipc"
    bucket_mb: float = 64.0
    load_mode: LoadMode = "in_place"
    pause_mode: PauseMode | None = None
    """What engines do with in-flight requests; None waits for idle (idle_timeout_s)."""
    idle_timeout_s: float = 30.0
    """With pause_mode None: how long an engine waits for its requests to finish before it
    refuses the update."""
    flush_cache: bool = True
    torch_empty_cache: bool = False
    verify: bool = False
    one_copy: bool = True
    """When every engine publishes the same store layout: plan buckets in it, so ipc writes
    each trainer tensor straight into the engines' stores and broadcast buckets land in
    place; False (or engines without one, e.g. vLLM): stage through a buffer."""
    timeout_s: float = 60.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_address: str = "127.0.0.1"
    disk_dir: str | None = None
    """Directory for the disk transport; None: a folder in the run directory."""
    delta: bool = False
    """Send per bucket only what changed since the version every engine acknowledged
    (`rlsync.plan.delta`; lossless and checked). The pusher keeps that version's bytes in host
    memory (one more copy of the model)."""
    delta_full_every: int = 50
    """With delta: every this many pushes, a full one (bounds what an unnoticed divergence
    could cost; 1: every push is full)."""
    delta_max_changed: float = 0.02
    """With delta: a bucket in which a sample finds more than this share of units changed
    is sent whole. Finding and applying scattered changes costs more per changed unit than
    sending it whole costs per unit; on the bench machine sparse pays below ~2% over
    broadcast (docs/BENCHMARKS.md). Raise it for slow networks."""
    commit: CommitMode = "independent"
    """independent: each engine switches once its bytes are in (a failed engine is reported,
    the others get the version). atomic: every engine switches or none does (needs
    load_mode shadow; see docs/PROTOCOL.md, Atomic commit)."""
    commit_timeout_s: float | None = None
    """atomic: how long an engine holds a ready update waiting for the commit before it
    discards it; None: 4 x timeout_s + idle_timeout_s."""

    def __post_init__(self) -> None:
        positive(self, "bucket_mb", "timeout_s", "delta_full_every")
        if not 0 <= self.delta_max_changed <= 1:
            raise ConfigError(
                f"sync.delta_max_changed: must be in [0, 1], got {self.delta_max_changed}"
            )
        if self.idle_timeout_s < 0:
            raise ConfigError(f"sync.idle_timeout_s: must be >= 0, got {self.idle_timeout_s}")
        self._check_commit()

    def _check_commit(self) -> None:
        """Atomic needs a shadow store: an in_place update cannot wait for the others
        without touching the live weights."""
        if self.commit == "atomic" and self.load_mode != "shadow":
            raise ConfigError(
                f"commit: 'atomic' needs load_mode 'shadow', got load_mode {self.load_mode!r}"
            )
        if self.commit_timeout_s is not None and not (
            2 * COMMIT_MARGIN_S < self.commit_timeout_s <= 3600.0
        ):
            raise ConfigError(
                f"commit_timeout_s: must be > {2 * COMMIT_MARGIN_S:g} and <= 3600 (the wire's "
                f"limit), got {self.commit_timeout_s}"
            )

    @property
    def commit_wait_s(self) -> float:
        """commit_timeout_s, or its default."""
        if self.commit_timeout_s is not None:
            return self.commit_timeout_s
        return min(4 * self.timeout_s + self.idle_timeout_s, 3600.0)  # the wire's limit

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))


def positive(obj: Any, *keys: str) -> None:
    """Raise ConfigError naming the first of `keys` whose value on `obj` is not > 0."""
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and value types; `prefix` is
    the dotted key of `raw` itself ("" at the top, "sync." for a section)."""
    if not isinstance(raw, dict):
        where = prefix.removesuffix(".") or cls.__name__
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = annotations.field_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = annotations.check(hints[key], value, dotted, _RULES)
    try:
        return cls(**kwargs)
    except (ConfigError, ModelConfigError) as exc:
        raise ConfigError(f"{prefix}{exc}") from None


_RULES = annotations.Rules(
    error=lambda where, problem: ConfigError(f"{where}: {problem}"),
    catch=(ConfigError,),
    build=lambda cls, value, where, depth: build(cls, value, where + "."),
    show=repr,
    float_strings=True,
)
"""Config rules: ConfigError naming the dotted key, bad values shown as written, "1e-4" a float."""
