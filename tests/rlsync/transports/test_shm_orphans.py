"""`remove_orphan_segments`: a segment goes only when its creator is dead, wherever the
creator's pid lives (containers sharing /dev/shm have their own pid namespaces)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlsync.transports.control import SHM_DIR, Segment, new_segment_name, remove_orphan_segments

ROOT = Path(__file__).resolve().parents[3]
NO_SUCH_PID = 2**22 + 1  # above the largest pid_max Linux allows: never a pid here
CREATOR = """
import sys
from rlsync.transports.control import Segment, new_segment_name
seg = Segment(sys.argv[1] or new_segment_name("data"), 4096, create=True)
print(seg.name, flush=True)
sys.stdin.read()  # live until the test closes our stdin
seg.close()
"""


def start_creator(
    name: str = "", prefix: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], str]:
    """A live process that created segment `name` (default: a name of its own, with its pid)
    and holds it until its stdin closes; returns the process and the segment's name."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", CREATOR, name],
        cwd=ROOT,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    made = proc.stdout.readline().strip()
    assert made == name if name else made.startswith(f"rlsync-{proc.pid}-")
    return proc, made


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


@pytest.fixture
def foreign_name() -> Iterator[str]:
    """A segment name whose pid does not exist in our pid namespace; unlinked afterwards."""
    name = f"rlsync-{NO_SUCH_PID}-{secrets.token_hex(6)}-data"
    yield name
    Path(SHM_DIR, name).unlink(missing_ok=True)


def test_a_live_segment_whose_creator_pid_is_not_ours_survives(foreign_name: str) -> None:
    assert not os.path.exists(f"/proc/{NO_SUCH_PID}")
    proc, _ = start_creator(foreign_name)
    try:
        assert foreign_name not in remove_orphan_segments()
        assert Path(SHM_DIR, foreign_name).stat().st_size == 4096
    finally:
        stop(proc)
    assert not Path(SHM_DIR, foreign_name).exists()  # its creator unlinked it on close


def test_a_segment_whose_creator_was_sigkilled_is_removed(foreign_name: str) -> None:
    for wanted in (foreign_name, ""):  # a name from another namespace, and the creator's own
        proc, name = start_creator(wanted)
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert Path(SHM_DIR, name).exists()
        assert name in remove_orphan_segments()
        assert not Path(SHM_DIR, name).exists()


def test_our_own_open_segment_survives_and_an_empty_unlocked_file_is_left_alone() -> None:
    seg = Segment(new_segment_name("ctl"), 64, create=True)
    empty = Path(SHM_DIR, new_segment_name("data"))  # a creator that has not locked yet
    empty.touch()
    try:
        removed = remove_orphan_segments()
        assert seg.name not in removed and empty.name not in removed
        assert Path(SHM_DIR, seg.name).exists()
    finally:
        seg.close()
        empty.unlink()
    assert not Path(SHM_DIR, seg.name).exists()


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    return (
        unshare is not None
        and subprocess.run(
            [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare of a pid namespace (root)")
def test_a_creator_in_another_pid_namespace_keeps_its_segment(foreign_name: str) -> None:
    proc, _ = start_creator(foreign_name, ("unshare", "--pid", "--fork", "--mount-proc"))
    try:
        assert foreign_name not in remove_orphan_segments()
    finally:
        stop(proc)
