"""Drive a `freeze_pusher_proc` process from a test: start it, read its lines with a bound,
tell it when to push, freeze, thaw or kill it, never leave it running."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from tests.reliability.freeze_cases import Case
from tests.reliability.freeze_checks import stopped

ROOT = Path(__file__).resolve().parents[2]
START_S = 60.0
"""Bound for the process to import torch and build its pusher on a loaded machine."""


class PusherProc:
    """One `freeze_pusher_proc` over `endpoints`, pushing `versions` of `ckpt`."""

    def __init__(
        self,
        endpoints: dict[str, str],
        case: Case,
        timeout_s: float,
        ckpt: Path,
        versions: list[int],
        work: Path,
    ):
        args = dict(
            endpoints=endpoints,
            case=asdict(case),
            timeout_s=timeout_s,
            ckpt=str(ckpt),
            versions=versions,
            work=str(work),
        )
        self.stderr = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "tests.reliability.freeze_pusher_proc", json.dumps(args)]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr
        )
        self.pushes_left = len(versions)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("")  # end of output

    def expect(self, word: str, timeout_s: float) -> str:
        """The next line that starts with `word` (its rest), within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"pusher said no {word} within {timeout_s:.0f}s") from None
            if line.startswith(word):
                return line[len(word) :].strip()
            if line == "" and self.proc.poll() is not None:
                raise AssertionError(f"pusher exited before {word}: {self.stderr_tail()}")

    def result(self, i: int, timeout_s: float) -> dict:
        out = json.loads(self.expect(f"RESULT{i}", timeout_s))
        self.pushes_left -= 1
        return out

    def go(self) -> None:
        """Start the next push."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def wait_stopped(self, timeout_s: float = 10.0) -> float:
        """Once it said STOPPING and the kernel has it stopped: that moment."""
        self.expect("STOPPING", timeout_s)
        deadline = time.monotonic() + timeout_s
        while not stopped(self.pid):
            assert time.monotonic() < deadline, "pusher did not stop"
            time.sleep(0.005)
        return time.monotonic()

    def stderr_tail(self, n: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-n:]

    def close(self) -> None:
        """After its last push it closes its pusher and exits (let it: killed there, it
        would leave its segments behind); otherwise it is killed now."""
        if self.pushes_left == 0:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.stderr.close()
