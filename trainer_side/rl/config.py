"""Trainer-side config: PPO (`TrainerConfig`), the reward task (`TaskConfig`) and what one
trainer rank reads from a run's config (`TrainerRankConfig`).

Plain dataclasses checked by `rlsync.config.build`; the RL application's `RunConfig`
(`rlsync.app.run_config`) nests these. Knows nothing about YAML, Ray or engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from rlsync.config import ConfigError, EngineConfig, SyncConfig, build, positive
from rlsync.model_config import ModelConfig


@dataclass(kw_only=True)
class TrainerConfig:
    """PPO trainer actors."""

    world_size: int = 1
    parallel: Literal["replicated", "fsdp"] = "replicated"
    """replicated: every rank holds the whole policy and gradients are all-reduced (DDP-like);
    fsdp: the policy runs under FSDP2 `fully_shard`, each rank holding a dim-0 shard."""
    fsdp_push: Literal["auto", "shards", "gather"] = "auto"
    """How an fsdp trainer pushes: shards (every rank writes its own rows; ipc on CPU only),
    gather (all-gather each parameter to rank 0, which pushes), auto (shards where they can
    go, else gather)."""
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
        positive(self, "world_size", "lr", "ppo_epochs", "minibatch_size")

    def push_method(self, transport: str, device: str, delta: bool = False) -> str:
        """ "replicated", "shards" or "gather": how this trainer's ranks push with `transport`
        on `device` (`delta`: sync.delta, whose encoder needs the whole tensors on rank 0);
        raises ConfigError when fsdp_push=shards cannot be done there."""
        if self.parallel == "replicated":
            return "replicated"
        shards_ok = (
            transport in ("ipc", "broadcast") and not device.startswith("cuda") and not delta
        )
        if self.fsdp_push == "shards" and not shards_ok:
            raise ConfigError(
                "trainer.fsdp_push=shards: needs sync.transport ipc or broadcast, on CPU, "
                f"without sync.delta "
                f"(got {transport!r} on {device!r}, delta {delta}); use gather or auto"
            )
        if self.fsdp_push == "auto":
            return "shards" if shards_ok else "gather"
        return self.fsdp_push


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
        positive(self, "prompts_per_step", "group_size", "max_new_tokens")


@dataclass(kw_only=True)
class TrainerRankConfig:
    """The sections of a run config one trainer rank uses (a run config has more keys)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    staleness: int = 0
    """How many versions old a rollout may be; 0 means always the latest push."""

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise ConfigError(f"staleness: must be >= 0, got {self.staleness}")

    @classmethod
    def from_run(cls, raw: dict[str, Any]) -> TrainerRankConfig:
        """Build from a whole run config's mapping, ignoring the keys a rank does not use."""
        names = {f.name for f in fields(cls)}
        return build(cls, {k: v for k, v in raw.items() if k in names}, "")
