"""Run configuration: nested dataclasses, loaded from YAML, overridden with `--set a.b=value`.

Every value is checked against its annotation when the config is built, and every error
names the dotted key ("trainer.lr: expected float, got 'fast'"). Nothing here reads the
environment; the launcher passes what it needs explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlsync.model_config import ModelConfig, ModelConfigError
from rlsync.protocol import LoadMode, PauseMode, TransportKind

_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""1e-4 and friends: YAML 1.1 (PyYAML) reads a float without a dot as a string."""


class ConfigError(ValueError):
    """A config key that is unknown or has a bad value; the message names the key."""


@dataclass(kw_only=True)
class EngineConfig:
    """One inference engine."""

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

    def __post_init__(self) -> None:
        _positive(self, "kv_tokens", "max_running", "max_prefill_tokens", "start_timeout_s", "call_timeout_s")


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
    timeout_s: float = 60.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_address: str = "127.0.0.1"
    disk_dir: str | None = None
    """Directory for the disk transport; None: a folder in the run directory."""

    def __post_init__(self) -> None:
        _positive(self, "bucket_mb", "timeout_s")
        if self.idle_timeout_s < 0:
            raise ConfigError(f"sync.idle_timeout_s: must be >= 0, got {self.idle_timeout_s}")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))


@dataclass(kw_only=True)
class TrainerConfig:
    """PPO trainer actors."""

    world_size: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    advantage: Literal["grpo", "baseline"] = "grpo"
    ppo_epochs: int = 1
    minibatch_size: int = 256
    seed: int = 0
    init_checkpoint: str | None = None
    """Hugging Face checkpoint directory to start from; None: random init from `model`."""

    def __post_init__(self) -> None:
        _positive(self, "world_size", "lr", "ppo_epochs", "minibatch_size")


@dataclass(kw_only=True)
class TaskConfig:
    """The rule-based reward task and how rollouts are sampled."""

    name: str = "copy_sequence"
    prompts_per_step: int = 32
    group_size: int = 8
    max_new_tokens: int = 4
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "prompts_per_step", "group_size", "max_new_tokens")


@dataclass(kw_only=True)
class RunConfig:
    """A whole RL run: trainers, engines, the sync between them and the task."""

    name: str = "default"
    steps: int = 300
    placement: Literal["colocated", "disaggregated"] = "colocated"
    num_engines: int = 1
    staleness: int = 0
    """How many versions old a rollout may be; 0 means always the latest push."""
    run_dir: str = "runs"
    ray_address: str | None = None
    """None starts a private local Ray; an address joins a cluster."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        _positive(self, "steps", "num_engines")
        if self.staleness < 0:
            raise ConfigError(f"staleness: must be >= 0, got {self.staleness}")


def _positive(obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = RunConfig) -> Any:
    """Read YAML (or start from defaults), apply `a.b=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        apply_override(raw, item)
    return build(cls, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`trainer.lr=1e-4` -> raw["trainer"]["lr"] = 1e-4 (the value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text else None


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking keys and value types."""
    if not isinstance(raw, dict):
        where = prefix.removesuffix(".") or cls.__name__
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except (ConfigError, ModelConfigError) as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, key) for v in value]
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        value = float(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for YAML dumps and Ray actor arguments)."""
    return dataclasses.asdict(cfg)
