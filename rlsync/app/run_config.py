"""Run configuration of the RL application: nested dataclasses, loaded from YAML, overridden
with `--set a.b=value`.

`RunConfig` nests the library's `EngineConfig` / `SyncConfig` (`rlsync.config`), the model
(`rlsync.model_config`) and the trainer's `TrainerConfig` / `TaskConfig`
(`trainer_side.rl.config`). Every value is checked against its annotation when the config is
built, and every error names the dotted key ("trainer.lr: expected float, got 'fast'").
Nothing here reads the environment; the launcher passes what it needs explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlsync.config import ConfigError, EngineConfig, SyncConfig, build, positive
from rlsync.model_config import ModelConfig
from trainer_side.rl.config import TaskConfig, TrainerConfig

__all__ = [
    "ConfigError",
    "EngineConfig",
    "RunConfig",
    "SyncConfig",
    "TaskConfig",
    "TrainerConfig",
    "apply_override",
    "load_config",
    "to_dict",
]


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
        positive(self, "steps", "num_engines")
        if self.staleness < 0:
            raise ConfigError(f"staleness: must be >= 0, got {self.staleness}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig
) -> Any:
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


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for YAML dumps and Ray actor arguments)."""
    return dataclasses.asdict(cfg)
