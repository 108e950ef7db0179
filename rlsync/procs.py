"""Child processes: the environment they start with, and stopping them for sure.

`child_env` makes a child run this checkout's code; `reap` ends a child and, when it leads
its own process group (`start_new_session=True`), everything it started, within a bound.
Nothing here knows what the children are (engines, Ray heads, benchmark senders).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
"""The directory holding the `rlsync`, `trainer_side` and `infer_side` packages."""


def child_env(
    extra: Mapping[str, str] | None = None, *, python_on_path: bool = False
) -> dict[str, str]:
    """Our environment for a child that must run this code: `ROOT` first on PYTHONPATH,
    then `extra` on top. `python_on_path`: this interpreter's directory first on PATH too,
    so a bare `python` (or `ray`) in the child is ours."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else ROOT
    if python_on_path:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def reap(process: subprocess.Popen | None, timeout_s: float = 5.0) -> int | None:
    """Stop `process`: SIGTERM, up to `timeout_s` for it to exit, then SIGKILL. Returns its
    exit code, or None if it still has not exited `timeout_s` after the SIGKILL (a process
    stuck in the kernel); at most about 2 x `timeout_s` in all.

    If it leads a process group (started with `start_new_session=True`), the group gets
    each signal too, and whatever is left of the group when the leader exits (or at the
    deadline) is killed: nothing it started outlives it. The leader is not reaped until the
    group has had its SIGKILL, so its pid, which is the group's id, cannot have been reused
    by then. A process that was already waited for is only waited for again.
    """
    if process is None:
        return None
    if process.returncode is None:
        deadline = time.monotonic() + timeout_s
        _signal(process, signal.SIGTERM)
        while not _exited(process) and time.monotonic() < deadline:
            time.sleep(0.01)
        _signal(process, signal.SIGKILL)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _signal(process: subprocess.Popen, sig: int) -> None:
    """`sig` to the process, and to its group if it leads one (a pid that leads no group
    names none, so this never reaches our own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, sig)


def _exited(process: subprocess.Popen) -> bool:
    """Whether the process has exited, without reaping it (it stays a zombie)."""
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # someone else reaped it
        return True
