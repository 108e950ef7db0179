"""Engine-side receiver processes for the baselines and limits, driven over their pipes.

Each receiver is `python -m rlsync.bench.receiver SPEC.json`; it reads one JSON command per
line on stdin and writes one JSON event per line on stdout (no pickle anywhere). A reader
thread per process files events into a queue, so every wait here is bounded and a receiver
that dies is reported with its stderr tail instead of hanging the benchmark. `close()`
always ends every process it started (exit command, then terminate, then kill).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from rlsync.procs import child_env


class ReceiverError(RuntimeError):
    """A receiver died, reported an error, or did not answer in time."""


class Receivers:
    """N receiver processes started from N spec dicts (written to `work_dir` as JSON)."""

    def __init__(
        self,
        specs: list[dict[str, Any]],
        work_dir: Path,
        timeout_s: float,
        module: str = "rlsync.bench.receiver",
    ):
        """`module`: what each process runs (`python -m MODULE SPEC.json`), e.g. the vLLM
        peers of `rlsync.bench.vllm_peers`, which speak the same protocol."""
        self.timeout_s = timeout_s
        self.module = module
        self.procs: list[subprocess.Popen] = []
        self.logs: list[IO[bytes]] = []
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        try:
            for i, spec in enumerate(specs):
                self._start(i, spec, work_dir)
        except BaseException:
            self.close()
            raise

    def _start(self, index: int, spec: dict[str, Any], work_dir: Path) -> None:
        path = work_dir / f"receiver-{os.getpid()}-{index}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", self.module, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=child_env(),
            text=True,
            bufsize=1,
        )
        self.procs.append(proc)
        self.logs.append(log)
        threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.events.put((index, json.loads(line)))
            except ValueError:
                self.events.put((index, {"event": "error", "message": f"bad line {line!r}"}))
        self.events.put((index, {"event": "exited"}))

    def send(self, command: dict[str, Any]) -> None:
        """Write one command line to every receiver."""
        line = json.dumps(command) + "\n"
        for i, proc in enumerate(self.procs):
            try:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError as exc:
                raise ReceiverError(f"receiver {i}: cannot send ({exc}){self._tail(i)}") from None

    def wait_all(self, event: str, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The next `event` from every receiver, in receiver order, within one deadline."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        got: dict[int, dict[str, Any]] = {}
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            try:
                index, ev = self.events.get(timeout=max(left, 0.0))
            except queue.Empty:
                missing = sorted(set(range(len(self.procs))) - set(got))
                raise ReceiverError(
                    f"receivers {missing}: no {event!r} within "
                    f"{timeout_s or self.timeout_s:.0f}s{self._tail(missing[0])}"
                ) from None
            if ev.get("event") in ("error", "exited"):
                raise ReceiverError(
                    f"receiver {index}: {ev.get('message', 'exited')}{self._tail(index)}"
                )
            if ev.get("event") == event:
                got[index] = ev
        return [got[i] for i in range(len(self.procs))]

    def _tail(self, index: int) -> str:
        log = self.logs[index]
        size = os.fstat(log.fileno()).st_size
        text = os.pread(log.fileno(), 2000, max(0, size - 2000)).decode(errors="replace")
        return f"; stderr tail:\n{text}" if text.strip() else ""

    def close(self, grace_s: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            stop_process(proc, grace_s)
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []

    def __enter__(self) -> Receivers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait `grace_s` for `proc` to exit, then terminate, then kill."""
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
