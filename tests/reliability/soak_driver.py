"""Sustained load: client threads generate (greedy and seeded sampling) on every engine
while a pusher lands version after version, paced so pushes spread over the whole run.

A request refused with "weights incomplete" (an in-place update is being written) is
resubmitted, and counted; any other error, or a batch without a final output within the
bound, fails the run. `verify` then checks every output against a fresh engine at the
version that produced it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from infer_side.process.client import EngineClient
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from rlsync.wire.protocol import GenerateOutput, SamplingParams
from tests.e2e.sync_helpers import trainer_weights
from tests.reliability.model import reference_outputs
from tests.reliability.procs import rss_kb
from trainer_side.sync.pusher import WeightPusher

RETRY_LIMIT = 200
REFUSED = "weights incomplete"


@dataclass
class Done:
    engine: str
    prompt: list[int]
    sampling: SamplingParams
    out: GenerateOutput


@dataclass
class SoakRun:
    """Everything one run saw."""

    requests: int
    pushes: int
    done: list[Done] = field(default_factory=list)
    refused: int = 0
    pushed: list[int] = field(default_factory=list)
    push_seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rss_kb: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)


def request_mix(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 3-20 tokens; every other request sampled (seeded, so it is reproducible)."""
    out = []
    for i in range(n):
        prompt = [rng.randrange(96) for _ in range(rng.randint(3, 20))]
        new = rng.randint(4, 32)
        params = (
            SamplingParams(max_new_tokens=new)
            if i % 2 == 0
            else SamplingParams(
                max_new_tokens=new, temperature=0.9, top_p=0.95, seed=rng.randrange(1 << 30)
            )
        )
        out.append((prompt, params))
    return out


def run_soak(
    engines: dict[str, EngineClient],
    ckpt: Path,
    work_dir: Path,
    *,
    requests: int,
    pushes: int,
    sync: SyncConfig,
    threads: int,
    batch: int,
    bound_s: float,
    seed: int = 0,
) -> SoakRun:
    """`threads` clients each keep one batch of `batch` requests in flight (so up to
    threads * batch concurrent requests); push k lands once k/(pushes+1) of them are done."""
    run = SoakRun(requests=requests, pushes=pushes)
    mix = request_mix(random.Random(seed), requests)
    chunks = [mix[i : i + batch] for i in range(0, len(mix), batch)]
    names = sorted(engines)
    pusher = WeightPusher(sync, {n: engines[n].endpoint for n in names}, work_dir)
    try:
        base = max(c.info().weight_version for c in engines.values())
        _push(pusher, ckpt, base + 1, run)  # both engines start the load on one version
        _sample_rss(engines, run)
        workers = [
            threading.Thread(
                target=_client, args=(engines, names, chunks, i, threads, bound_s, run)
            )
            for i in range(threads)
        ]
        for w in workers:
            w.start()
        for k in range(pushes):
            _wait_progress(run, (k + 1) * requests // (pushes + 1), workers)
            _push(pusher, ckpt, base + 2 + k, run)
        for w in workers:
            w.join()
    finally:
        pusher.close()
    _sample_rss(engines, run)
    return run


def _push(pusher: WeightPusher, ckpt: Path, version: int, run: SoakRun) -> None:
    start = time.monotonic()
    report = pusher.push(trainer_weights(ckpt, version), version)
    run.push_seconds.append(time.monotonic() - start)
    if report.failed:
        run.errors.append(f"push {version}: {report.summary()}")
    run.pushed.append(version)


def _wait_progress(run: SoakRun, target: int, workers: list[threading.Thread]) -> None:
    while len(run.done) < target and any(w.is_alive() for w in workers):
        time.sleep(0.01)


def _client(
    engines: dict[str, EngineClient],
    names: list[str],
    chunks: list,
    index: int,
    threads: int,
    bound_s: float,
    run: SoakRun,
) -> None:
    for c in range(index, len(chunks), threads):
        name = names[c % len(names)]
        try:
            _generate(engines[name], name, chunks[c], bound_s, run)
        except Exception as exc:  # a timeout (hang) or a dead engine: the run fails on it
            with run.lock:
                run.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        if c % 5 == 0:
            _sample_rss(engines, run)


def _generate(engine: EngineClient, name: str, chunk: list, bound_s: float, run: SoakRun) -> None:
    pending = list(chunk)
    for _ in range(RETRY_LIMIT):
        outs = engine.generate([p for p, _ in pending], [s for _, s in pending], timeout_s=bound_s)
        again = []
        for (prompt, params), out in zip(pending, outs, strict=True):
            if REFUSED in out.error:
                again.append((prompt, params))
            elif out.error:
                run.errors.append(f"{name}: {out.error}")
            else:
                with run.lock:
                    run.done.append(Done(name, prompt, params, out))
        with run.lock:
            run.refused += len(again)
        if not again:
            return
        pending = again
        time.sleep(0.05)
    run.errors.append(f"{name}: {len(pending)} requests refused {RETRY_LIMIT} times")


def _sample_rss(engines: dict[str, EngineClient], run: SoakRun) -> None:
    for name, client in engines.items():
        run.rss_kb[name].append(rss_kb(client.process.pid))


def verify(run: SoakRun, cfg: ModelConfig, ckpt: Path) -> dict:
    """Every output's version was pushed; outputs of one version equal a fresh engine's."""
    by_version: dict[int, list[Done]] = defaultdict(list)
    spanning = 0
    for d in run.done:
        assert d.out.weight_version in run.pushed, (d.out.weight_version, run.pushed)
        if d.out.min_weight_version != d.out.weight_version:
            spanning += 1  # the reference is one version per output: spans are tested elsewhere
            continue
        by_version[d.out.weight_version].append(d)
    mismatched = 0
    for version, items in by_version.items():
        want = reference_outputs(
            cfg,
            trainer_weights(ckpt, version),
            [d.prompt for d in items],
            [d.sampling for d in items],
        )
        mismatched += sum(d.out.output_ids != w for d, w in zip(items, want, strict=True))
    return {
        "spanning": spanning,
        "compared": len(run.done) - spanning,
        "mismatched": mismatched,
        "versions_seen": len(by_version),
    }
