"""`rlsync.procs`: children run this checkout's code; `reap` ends a child and its process
group within its bound, even when they ignore SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsync.procs import ROOT, child_env, reap

# Ignores SIGTERM, starts a grandchild that ignores it too (SIG_IGN is inherited), prints
# the grandchild's pid, then sleeps.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for its parent (init) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def start_stubborn(**popen: object) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True, **popen
    )  # type: ignore[call-overload]
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_reap_kills_a_process_group_that_ignores_sigterm_within_its_bound() -> None:
    proc, grandchild = start_stubborn(start_new_session=True)
    t0 = time.monotonic()
    assert reap(proc, timeout_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 0.5 + 2.0
    deadline = time.monotonic() + 5
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(grandchild)


def test_reap_ends_a_cooperative_child_with_sigterm_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    t0 = time.monotonic()
    assert reap(proc, timeout_s=30) == -signal.SIGTERM
    assert time.monotonic() - t0 < 5


def test_reap_of_a_child_in_our_own_group_kills_only_the_child() -> None:
    proc, grandchild = start_stubborn()  # same process group as pytest
    try:
        assert reap(proc, timeout_s=0.3) == -signal.SIGKILL  # and we are still here
        assert not gone(grandchild)  # not in a group of its parent's: out of reap's reach
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_reap_of_nothing_or_of_an_exited_child_returns_its_code() -> None:
    assert reap(None) is None
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert reap(proc) == 3


def test_a_child_with_child_env_imports_this_checkout(tmp_path: Path) -> None:
    env = child_env({"RLSYNC_TEST_MARK": "1"}, python_on_path=True)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    out = subprocess.run(
        [
            "python",
            "-c",
            "import os, rlsync; print(rlsync.__file__, os.environ['RLSYNC_TEST_MARK'])",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    where, mark = out.stdout.split()
    assert Path(where).is_relative_to(ROOT) and mark == "1"


@pytest.mark.parametrize("before", [None, "/elsewhere"])
def test_child_env_keeps_an_existing_pythonpath_after_ours(
    monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    if before is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", before)
    assert child_env()["PYTHONPATH"] == (f"{ROOT}{os.pathsep}{before}" if before else ROOT)
