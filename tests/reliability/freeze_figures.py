"""The issue-19 figures: two engines behind one WeightPusher (the README's Python API), one
of them frozen (SIGSTOP) across a push and thawed (SIGCONT) once the push has returned,
while the pusher lives. For each transport x load mode it prints how long the push took
without a freeze and with one engine frozen, what the thawed engine then holds and serves,
and whether the next push from the same pusher reaches it.

    python -m tests.reliability.freeze_figures --timeout-s 5 [--rows ipc-one-copy,disk]

Engines are ours (the tiny reliability model); each row starts from both engines on one
known version (a full push), and an engine that no longer answers is replaced.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from infer_side.process.client import EngineClient, launch_engine
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from tests.e2e.sync_helpers import PROMPTS, greedy
from tests.reliability.freeze_checks import Checkpoints, frozen, settle, verdict
from tests.reliability.model import make_checkpoint, reference_outputs
from trainer_side.sync.push_report import PushError, PushReport
from trainer_side.sync.pusher import WeightPusher

ROWS = {
    "ipc-one-copy": ("ipc", True),
    "ipc-staged": ("ipc", False),
    "broadcast": ("broadcast", True),
    "disk": ("disk", True),
}
MODES = ("in_place", "shadow")
NAMES = ("e0", "e1")
FROZEN = "e1"


@dataclass
class Row:
    """One transport x load mode: what the freeze cost and what it left behind."""

    label: str
    mode: str
    plain_s: float = 0.0
    frozen_s: float = 0.0
    frozen_outcome: str = ""
    settle_s: float = 0.0
    other: str = ""
    thawed: str = ""
    next_s: float = 0.0
    next_reaches: str = ""


class Figures:
    """Two engines, the checkpoints of every version pushed, and one row at a time."""

    def __init__(self, timeout_s: float, work: Path):
        self.timeout_s, self.work = timeout_s, work
        self.ckpt = make_checkpoint(work / "model", seed=3)
        cfg = ModelConfig.from_dir(self.ckpt)
        self.engines = dict(zip(NAMES, _launch(self.ckpt, len(NAMES)), strict=True))
        dtypes = {s.name: s.dtype for s in self.engines["e0"].weight_specs().specs}
        self.checkpoints = Checkpoints(
            self.ckpt, dtypes, lambda t: reference_outputs(cfg, t, PROMPTS, [greedy()] * 3)
        )
        self.version = 0
        self.pushes = 0

    def _pusher(self, transport: str, one_copy: bool, mode: str, names=NAMES) -> WeightPusher:
        self.pushes += 1
        cfg = SyncConfig(
            transport=transport,
            load_mode=mode,
            one_copy=one_copy,
            bucket_mb=0.02,
            timeout_s=self.timeout_s,
        )
        endpoints = {n: self.engines[n].endpoint for n in names}
        return WeightPusher(cfg, endpoints, self.work / f"push{self.pushes}")

    def _push(self, pusher: WeightPusher) -> tuple[float, PushReport | str]:
        self.version += 1
        tensors = self.checkpoints.tensors(self.version)
        start = time.monotonic()
        try:
            report: PushReport | str = pusher.push(tensors, self.version)
        except PushError as exc:
            report = f"PushError: {exc}"[:160]
        return time.monotonic() - start, report

    def row(self, label: str, mode: str) -> Row:
        transport, one_copy = ROWS[label]
        out = Row(label, mode)
        self.repair()
        pusher = self._pusher(transport, one_copy, mode)
        try:
            out.plain_s, _ = self._push(pusher)
            with frozen(self.engines[FROZEN].process.pid):
                out.frozen_s, report = self._push(pusher)
            out.frozen_outcome = _outcome(report)
            out.settle_s = settle(self.engines[FROZEN], 4 * self.timeout_s)
            out.other = verdict(self.engines["e0"], self.checkpoints).short()
            out.thawed = verdict(self.engines[FROZEN], self.checkpoints).short()
            out.next_s, report = self._push(pusher)
            out.next_reaches = self._reached(report)
        finally:
            pusher.close()
        return out

    def _reached(self, report: PushReport | str) -> str:
        """Whether the last push landed on the thawed engine: its report and its bytes."""
        seen = verdict(self.engines[FROZEN], self.checkpoints)
        landed = seen.ok and seen.version == self.version
        ok = isinstance(report, PushReport) and FROZEN in report.succeeded
        return f"{'yes' if landed and ok else 'no'} ({seen.short()})"

    def repair(self) -> None:
        """Every engine on one new version, whole (a fresh one replaces an engine that does
        not take it)."""
        self.version += 1
        tensors = self.checkpoints.tensors(self.version)
        for name in NAMES:
            if not self._repair_one(name, tensors):
                self.engines[name].close()
                self.engines[name] = _launch(self.ckpt, 1)[0]
                assert self._repair_one(name, tensors), f"{name}: a fresh engine refused"

    def _repair_one(self, name: str, tensors: dict) -> bool:
        try:
            pusher = self._pusher("ipc", True, "in_place", names=(name,))
        except Exception:
            return False
        try:
            return (
                pusher.push(tensors, self.version).failed == []
                and verdict(self.engines[name], self.checkpoints).ok
            )
        except Exception:
            return False
        finally:
            pusher.close()

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def _launch(ckpt: Path, n: int) -> list[EngineClient]:
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(launch_engine, ckpt, kv_tokens=512, threads=1) for _ in range(n)]
        return [f.result() for f in futures]


def _outcome(report: PushReport | str) -> str:
    if isinstance(report, str):
        return report
    return f"ok {','.join(report.succeeded) or '-'}; failed {','.join(report.failed) or '-'}"


def print_table(rows: list[Row], timeout_s: float) -> None:
    print(f"timeout_s {timeout_s:g}; {FROZEN} frozen across the 2nd push, thawed after it")
    head = (
        "transport | load | push s | push s, e1 frozen | that push | e1 settled s | "
        "e0 after | e1 after thaw | next push s | next push reaches e1"
    )
    print(head)
    print("|".join("---" for _ in head.split("|")))
    for r in rows:
        cells = [
            r.label,
            r.mode,
            f"{r.plain_s:.2f}",
            f"{r.frozen_s:.2f}",
            r.frozen_outcome,
            f"{r.settle_s:.2f}",
            r.other,
            r.thawed,
            f"{r.next_s:.2f}",
            r.next_reaches,
        ]
        print(" | ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ",".join(ROWS))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlsync-freeze-") as tmp:
        figures = Figures(args.timeout_s, Path(tmp))
        rows = []
        try:
            for label in args.rows.split(","):
                for mode in args.modes.split(","):
                    rows.append(figures.row(label, mode))
                    print(f"# {rows[-1]}", flush=True)
        finally:
            figures.close()
    print_table(rows, args.timeout_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
