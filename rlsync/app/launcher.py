"""The RL loop on Ray: the one module that knows both the trainer side and the inference side.

    result = run(load_config("configs/colocated_cpu.yaml"))

Build (`RLRun.__init__`): placement groups -> the initial checkpoint (runs/NAME/initial,
weight_version 0) -> trainer ranks and engines start together, all from that checkpoint ->
trainers join their data-parallel group -> rank 0's WeightPusher connects to every engine.
With `trainer.parallel: fsdp` every rank takes part in connecting, pushing and saving.
Then per step s (`RLRun.step`):
    1. batches s .. s + staleness are submitted (those not yet): prompts sampled (task),
       `group_size` copies each, groups dealt to the engines (`rlsync.app.rollouts`)
    2. wait for batch s; each token names the weight version that produced it
    3. PPO step on every trainer rank (its share of whole groups); with staleness 0 the
       trainer refuses rollouts of an older version, with staleness k it drops (and counts)
       the samples whose oldest token is more than k versions behind its own
    4. rank 0 pushes the new version to every engine (while they generate the batches
       ahead, when staleness > 0). An engine the push missed (frozen, slow, dead) gets no
       new batches until a later push reaches it (the pusher pings it before each push and
       brings it back in full: `EngineRoster`); a push that reached no engine (an atomic
       push one engine stopped) is made once more at once, now without the engines that
       did not answer; only when that reaches none either does the run end
    5. one line in runs/NAME/metrics.jsonl; the progress bar shows reward, KL, push time
With staleness 0 the engines sit idle while the trainer trains and pushes, and the trainer
waits while they generate; with staleness k >= 1 the engines generate batch s+1 .. s+k
meanwhile, off-policy by up to k versions (the PPO ratio is taken against the engine's
own log-probs, the behaviour policy: see docs/ASYNC.md).
At the end (`RLRun.finish`): the final checkpoint goes to runs/NAME/final, the weights of
every engine in use must equal the trainer's (fingerprints; engines still behind are named
in summary.json as `engines_behind`), metrics.png and summary.json are written. Every
wait is bounded: an actor that dies or hangs ends the run with a RunError naming it and
the step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import yaml
from tqdm import tqdm

from infer_side.actor import InferenceActor
from rlsync.app import metrics, ray_session
from rlsync.app.plot import plot_metrics
from rlsync.app.ray_session import ActorCallError, gather
from rlsync.app.rollouts import (
    EngineRoster,
    PendingBatch,
    RolloutQueue,
    oldest_version,
    output_token_versions,
    reached_any,
    version_stats,
)
from rlsync.app.run_config import RunConfig, to_dict
from rlsync.config import ConfigError
from rlsync.wire.auth import generate_keys
from rlsync.wire.protocol import GenerateOutput, SamplingParams
from trainer_side.rl.actor import TrainerActor
from trainer_side.rl.learner import RolloutBatch
from trainer_side.rl.policy import LlamaPolicy
from trainer_side.rl.task import get_task

TRAIN_TIMEOUT_S = 1800.0
"""Bound on one PPO step of one rank (no config key for it yet)."""
CLOSE_TIMEOUT_S = 30.0
SETUP_SLACK_S = 60.0
"""Added to a configured timeout for Ray's own part (worker start, transfer)."""


class RunError(RuntimeError):
    """The run could not go on; the message names the actor, the step and the reason."""


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    final_checkpoint: Path
    wall_s: float
    mismatches: dict[str, list[str]]


def checked(cfg: RunConfig) -> RunConfig:
    """The config this run uses: placement decides the transport; shapes must split evenly."""
    if cfg.placement == "disaggregated" and cfg.sync.transport == "ipc":
        cfg = replace(cfg, sync=replace(cfg.sync, transport="broadcast"))
    if cfg.task.prompts_per_step % cfg.trainer.world_size:
        raise ConfigError(
            f"task.prompts_per_step={cfg.task.prompts_per_step} must be a multiple "
            f"of trainer.world_size={cfg.trainer.world_size} (whole groups per rank)"
        )
    cfg.trainer.push_method(cfg.sync.transport, cfg.engine.device, cfg.sync.delta)  # fits
    check_staleness(cfg)
    if cfg.task.prompts_per_step < cfg.num_engines:
        raise ConfigError(
            f"task.prompts_per_step={cfg.task.prompts_per_step} leaves some of the "
            f"num_engines={cfg.num_engines} engines idle"
        )
    return cfg


def check_staleness(cfg: RunConfig) -> None:
    """Sync settings under which rollouts submitted ahead would be lost. (Those that reach an
    engine while an in_place push writes its weights are refused, and sent again after it:
    `infer_side.process.client.generate_through_updates`.)"""
    if cfg.staleness >= 1 and cfg.sync.pause_mode == "abort":
        raise ConfigError(
            f"staleness={cfg.staleness} with sync.pause_mode=abort: every push would abort the "
            "rollouts in flight; use retract, in_place or null"
        )


def run(cfg: RunConfig, *, progress: bool = True) -> RunResult:
    """Start (or join) Ray, run every step, check and save; Ray is left as it was found."""
    cfg = checked(cfg)
    run_dir = prepare_run_dir(cfg)
    actors = cfg.trainer.world_size + cfg.num_engines
    session = ray_session.connect(cfg.ray_address, run_dir / "ray", num_cpus=actors + 1)
    try:
        with RLRun(cfg, run_dir) as rl:
            return run_steps(rl, progress)
    finally:
        ray_session.disconnect(session)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """runs/NAME (absolute), with the config this run uses written into it."""
    run_dir = Path(cfg.run_dir).resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def run_steps(rl: RLRun, progress: bool = True) -> RunResult:
    """Every step of `rl.cfg` under a progress bar, then `finish`."""
    with tqdm(total=rl.cfg.steps, desc=rl.cfg.name, unit="step", disable=not progress) as bar:
        for step in range(rl.cfg.steps):
            row = rl.step(step)
            bar.set_postfix(
                reward=f"{row['reward_mean']:.3f}",
                kl=f"{row['kl']:.2e}",
                push_ms=f"{row['push_s'] * 1e3:.1f}",
            )
            bar.update()
    return rl.finish(time.perf_counter() - rl.started)


def deal(n_groups: int, n_parts: int) -> list[range]:
    """Contiguous, as-even-as-possible ranges of group indices, one per part."""
    base, extra = divmod(n_groups, n_parts)
    bounds = [0]
    for i in range(n_parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(n_parts)]


class RLRun:
    """The actors of one run and the step loop over them."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.started = time.perf_counter()
        self.task = get_task(cfg.task.name, cfg.model)
        self.rng = random.Random(cfg.task.seed)
        self.trainers: dict[str, Any] = {}
        self.engines: dict[str, Any] = {}
        self.roster = EngineRoster([f"engine{i}" for i in range(cfg.num_engines)])
        self.placement: ray_session.Placement | None = None
        self.auth_keys: str | None = None
        """CURVE key directory when the engines listen on tcp:// (disaggregated)."""
        self.metrics = metrics.MetricsLog(run_dir / "metrics.jsonl")
        self.rollouts = RolloutQueue(self._submit, ahead=cfg.staleness)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ build

    def _build(self) -> None:
        """Every actor starts at once (worker start-up dominates on small models); engines and
        trainers all load the same initial checkpoint, so they begin bit-identical."""
        cfg = self.cfg
        self.placement = ray_session.place(
            cfg.placement,
            cfg.trainer.world_size,
            cfg.num_engines,
            cfg.engine.device.startswith("cuda"),
            timeout_s=cfg.engine.start_timeout_s,
        )
        model_dir = cfg.trainer.init_checkpoint or self._write_initial_checkpoint()
        self._start_trainers(model_dir)
        self._start_engines(model_dir)
        self._setup_trainers()
        endpoints = self._wait(self._each(self.engines, "endpoint"), "start", self._start_s())
        self._call_pushers(
            "connect_engines",
            "connecting the weight pusher to the engines",
            endpoints,
            self._master_address(),
            self.auth_keys,
        )

    def _write_initial_checkpoint(self) -> str:
        """runs/NAME/initial: the model the trainers and engines start from (version 0)."""
        path = self.run_dir / "initial"
        policy = LlamaPolicy.from_config(self.cfg.model, seed=self.cfg.trainer.seed)
        return str(policy.save_pretrained(path))

    def _start_trainers(self, model_dir: str) -> None:
        assert self.placement is not None
        cfg = replace(self.cfg, trainer=replace(self.cfg.trainer, init_checkpoint=model_dir))
        remote = ray.remote(TrainerActor)
        for rank in range(cfg.trainer.world_size):
            self.trainers[f"trainer rank {rank}"] = remote.options(
                **self.placement.trainer_options(rank)
            ).remote(to_dict(cfg), rank, str(self.run_dir))

    def _setup_trainers(self) -> None:
        rdzv: tuple[str | None, int | None] = (None, None)
        if self.cfg.trainer.world_size > 1 or self._sharded:
            rdzv = self._call_rank0("rendezvous", "opening the trainers' rendezvous")
        self._wait(
            {n: a.setup.remote(*rdzv) for n, a in self.trainers.items()}, "setup", self._start_s()
        )

    def _start_engines(self, model_dir: str) -> None:
        assert self.placement is not None
        remote = ray.remote(InferenceActor)
        endpoint = self.cfg.engine.endpoint
        if self.cfg.placement == "disaggregated" and endpoint is None:
            endpoint = "tcp://{host}:*"  # each engine binds its node's address, any port
        if endpoint is not None and endpoint.startswith("tcp://"):
            # tcp:// engines accept CURVE-authenticated clients only: keys for this run
            self.auth_keys = str(generate_keys(self.run_dir / "keys"))
        engine_cfg = to_dict(self.cfg.engine) | {"disk_root": self._disk_root()}
        for i in range(self.cfg.num_engines):
            name = f"engine{i}"
            self.engines[name] = remote.options(**self.placement.engine_options(i)).remote(
                name, model_dir, engine_cfg, endpoint, auth_keys=self.auth_keys
            )

    def _disk_root(self) -> str:
        """Where the engines may read disk updates from: `engine.disk_root`, else where the
        pusher writes them (`sync.disk_dir`, else inside the run directory)."""
        root = self.cfg.engine.disk_root or self.cfg.sync.disk_dir or self.run_dir
        return str(Path(root).resolve())

    def _master_address(self) -> str | None:
        """Where engines reach trainer rank 0 for the broadcast group: the configured address,
        unless it is loopback while some engine runs on another node (then rank 0's node)."""
        if self.cfg.sync.master_address not in ("127.0.0.1", "localhost"):
            return None
        nodes = self._wait(self._each(self.engines, "node_address"), "node_address", 60.0)
        mine = self._call_rank0("node_address", "node_address")
        return mine if any(n != mine for n in nodes.values()) else None

    def _start_s(self) -> float:
        return self.cfg.engine.start_timeout_s + SETUP_SLACK_S

    # ------------------------------------------------------------ one step

    def step(self, step: int) -> dict[str, Any]:
        """One step: take batch `step` (submitting batches ahead up to `staleness`), train on
        it, push the new version. With staleness 0 nothing is ahead: the engines generate,
        then the trainer trains, then the push, as before."""
        t0 = time.perf_counter()
        pending = self.rollouts.take(step, self.cfg.steps - 1)
        outputs, gen_s = self._collect(pending)
        rollout_wait_s = time.perf_counter() - t0
        batch, versions = self._batch(pending.prompts, outputs, step)
        t1 = time.perf_counter()
        stats = self._train(batch, versions, step)
        t2 = time.perf_counter()
        report = self._push(step, step + 1)  # rank 0 holds version step + 1 after training
        step_s = time.perf_counter() - t0
        tokens = sum(len(o.output_ids) for o in outputs)
        rollout_s = max(gen_s.values())
        row = {
            "step": step,
            "weight_version": min(versions),
            **version_stats(outputs),
            **metrics.reward_stats(batch.rewards),
            **stats,
            **metrics.push_stats(report),
            "rollout_s": rollout_s,
            "rollout_wait_s": rollout_wait_s,
            "rollout_tokens": tokens,
            "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9),
            "train_s": t2 - t1,
            "step_s": step_s,
            "engine_idle_frac": metrics.idle_fraction(list(gen_s.values()), step_s),
            "wall_s": time.perf_counter() - self.started,
            "pushed_version": report["version"],
            "engines_behind": len(self.roster.behind),
        }
        self.metrics.write(row)
        return row

    def _submit(self, step: int) -> PendingBatch:
        """Sample batch `step`'s prompts and hand each engine its share of whole groups."""
        task = self.cfg.task
        groups = self.task.sample_prompts(task.prompts_per_step, self.rng)
        names = self.roster.in_use()
        if not names:  # (a push that reached no engine ends the run first)
            raise RunError(f"step {step}: no engine holds the current version")
        parts = deal(len(groups), len(names))
        calls = {}
        for name, part in zip(names, parts, strict=True):
            engine = self.engines[name]
            prompts = [groups[g] for g in part for _ in range(task.group_size)]
            first = part.start * task.group_size
            sampling = self._sampling(step, first, len(prompts))
            calls[name] = engine.generate_timed.remote(prompts, sampling)
        prompts = [groups[g] for part in parts for g in part for _ in range(task.group_size)]
        return PendingBatch(step, prompts, calls)

    def _collect(self, pending: PendingBatch) -> tuple[list[GenerateOutput], dict[str, float]]:
        """The batch's outputs in prompt order, and each engine's seconds generating it."""
        step = pending.step
        results = self._wait(
            pending.calls,
            f"rollouts at step {step}",
            self.cfg.engine.call_timeout_s + SETUP_SLACK_S,
        )
        outputs = [out for name in pending.calls for out in results[name][0]]
        self._check_outputs(outputs, step)
        return outputs, {name: results[name][1] for name in pending.calls}

    def _sampling(self, step: int, first: int, count: int) -> list[SamplingParams]:
        """One seeded stream per sample (task seed, step, index): a run replays exactly."""
        task = self.cfg.task
        base = (task.seed * 1_000_003 + step) * 1_000_000 + first
        return [
            SamplingParams(
                max_new_tokens=max(task.max_new_tokens, self.task.answer_len),
                temperature=task.temperature,
                seed=(base + i) % (1 << 62),
            )
            for i in range(count)
        ]

    def _check_outputs(self, outputs: list[GenerateOutput], step: int) -> None:
        bad = [o.error for o in outputs if o.error]
        if bad:
            raise RunError(f"step {step}: {len(bad)} rollouts failed on the engines: {bad[0]}")

    def _batch(
        self, prompts: list[list[int]], outputs: list[GenerateOutput], step: int
    ) -> tuple[RolloutBatch, list[int]]:
        """The trainer's batch (with every token's version) and each sample's oldest version."""
        completions = [list(o.output_ids) for o in outputs]
        rewards = [self.task.reward(p, c) for p, c in zip(prompts, completions, strict=True)]
        logprobs = [list(o.logprobs) for o in outputs]
        token_versions = [output_token_versions(o) for o in outputs]
        batch = RolloutBatch(prompts, completions, logprobs, rewards, token_versions)
        return batch, [oldest_version(o) for o in outputs]

    def _train(self, batch: RolloutBatch, versions: list[int], step: int) -> dict[str, float]:
        size = self.cfg.task.group_size
        parts = deal(len(batch.prompts) // size, len(self.trainers))
        calls = {}
        for (name, trainer), part in zip(self.trainers.items(), parts, strict=True):
            rows = range(part.start * size, part.stop * size)
            shard = RolloutBatch(
                *(
                    None if getattr(batch, f) is None else [getattr(batch, f)[i] for i in rows]
                    for f in ("prompts", "completions", "logprobs", "rewards", "token_versions")
                )
            )
            calls[name] = trainer.train_step.remote(shard, [versions[i] for i in rows])
        stats = list(self._wait(calls, f"the PPO step at step {step}", TRAIN_TIMEOUT_S).values())
        return {
            **metrics.mean_over_ranks(stats, self.cfg.trainer.kl_coef > 0),
            **metrics.staleness_stats(stats),
        }

    def _push(self, step: int, version: int) -> dict[str, Any]:
        """Push; a push that reached no engine is made once more (the engines that did not
        answer are left out of it now). The engines it missed sit out (`EngineRoster`)."""
        what = f"the push of version {version} at step {step}"
        report = self._call_pushers("push", what)
        if not reached_any(report):
            report = self._call_pushers("push", f"{what} (made again: it reached no engine)")
        if not reached_any(report):
            details = "; ".join(f"{n}: {report['engines'][n]['message']}" for n in report["failed"])
            raise RunError(
                f"step {step}: the push of version {version} reached no engine ({details})"
            )
        self.roster.after_push(report)
        return report

    # ------------------------------------------------------------ end of run

    def finish(self, wall_s: float) -> RunResult:
        """Save the final checkpoint, compare engine and trainer weights, plot, summarise."""
        final = self.run_dir / "final"
        self._call_pushers("save_checkpoint", "saving the final checkpoint", str(final))
        serving = {n: self.engines[n] for n in self.roster.in_use()}
        engines = self._wait(
            self._each(serving, "fingerprints"), "fingerprints", self.cfg.engine.call_timeout_s
        )
        first = {"engine": next(iter(serving.values())).weight_specs.remote()}
        specs = self._wait(first, "weight specs", self.cfg.engine.call_timeout_s)["engine"]
        dtypes = {s.name: s.dtype for s in specs.specs}
        ranks = self._wait(
            {n: t.fingerprints.remote(dtypes) for n, t in self.trainers.items()},
            "fingerprints",
            TRAIN_TIMEOUT_S,
        )
        mismatches = metrics.compare_fingerprints(ranks, engines, self.cfg.steps)
        rows = self.metrics.rows
        if rows:
            plot_metrics(rows, self.run_dir / "metrics.png", title=self.cfg.name)
        metrics.write_summary(
            self.run_dir / "summary.json",
            rows,
            wall_s=wall_s,
            final_checkpoint=final,
            mismatches=mismatches,
            weights_fingerprint=metrics.weights_fingerprint(ranks["trainer rank 0"]),
            engine_versions={n: p.weight_version for n, p in engines.items()},
            engines_behind=sorted(self.roster.behind),
        )
        if any(mismatches.values()):
            bad = {n: m[:3] for n, m in mismatches.items() if m}
            raise RunError(
                f"after the last push the engines' weights differ from the trainer's: {bad}"
            )
        return RunResult(self.run_dir, rows, final, wall_s, mismatches)

    # ------------------------------------------------------------ calls and cleanup

    def _each(self, actors: dict[str, Any], method: str) -> dict[str, Any]:
        return {name: getattr(actor, method).remote() for name, actor in actors.items()}

    @property
    def _sharded(self) -> bool:
        return self.cfg.trainer.parallel == "fsdp"

    def _call_pushers(self, method: str, what: str, *args: Any) -> Any:
        """Rank 0's answer to `method`; with a sharded trainer every rank takes part (its
        shards, or its side of the all-gathers), and every rank must answer."""
        if not self._sharded:
            return self._call_rank0(method, what, *args)
        calls = {n: getattr(t, method).remote(*args) for n, t in self.trainers.items()}
        timeout = max(TRAIN_TIMEOUT_S if method == "push" else 0, self._start_s())
        return self._wait(calls, what, timeout)["trainer rank 0"]

    def _call_rank0(self, method: str, what: str, *args: Any) -> Any:
        ref = getattr(self.trainers["trainer rank 0"], method).remote(*args)
        timeout = max(TRAIN_TIMEOUT_S if method == "push" else 0, self._start_s())
        return self._wait({"trainer rank 0": ref}, what, timeout)["trainer rank 0"]

    def _wait(self, calls: dict[str, Any], what: str, timeout_s: float) -> dict[str, Any]:
        try:
            return gather(calls, what, timeout_s)
        except ActorCallError as exc:
            raise RunError(str(exc)) from exc

    def close(self) -> None:
        """Close the trainers (the pusher leaves the engines' groups), then the engines (they
        stop their processes), then kill every actor; each stage bounded."""
        self.metrics.close()
        for group in (self.trainers, self.engines):
            refs = [a.close.remote() for a in group.values()]
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)
        for actor in {**self.trainers, **self.engines}.values():
            ray.kill(actor)
        if self.placement is not None:
            self.placement.remove()

    def __enter__(self) -> RLRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
