"""What a process holds, read from /proc and /dev/shm: the leak checks after each fault.

`Snapshot.take(pid)` records fds, threads and RSS of an engine process; `own_segments(pid)`
lists the shared-memory segments that pid created (their names carry the creator's pid).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


def status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (values stripped)."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def rss_kb(pid: int) -> int:
    return int(status(pid)["VmRSS"].split()[0])


def peak_rss_kb(pid: int) -> int:
    return int(status(pid)["VmHWM"].split()[0])


def own_segments(pid: int) -> set[str]:
    """Shared-memory segments created by `pid` (rlsync names them rlsync-<pid>-...)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"rlsync-{pid}-")}


@dataclass(frozen=True)
class Snapshot:
    """Resources one process holds at a moment."""

    fds: int
    threads: int

    @classmethod
    def take(cls, pid: int) -> Snapshot:
        return cls(fds=len(os.listdir(f"/proc/{pid}/fd")), threads=int(status(pid)["Threads"]))


def settled(pid: int, before: Snapshot, timeout_s: float = 10.0) -> Snapshot:
    """The process's snapshot once it is back to `before` (worker threads and sockets take a
    moment to go), or the last one seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = Snapshot.take(pid)
        if now == before or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def local_threads_settled(before: set[str], timeout_s: float = 10.0) -> set[str]:
    """Names of this process's threads that were not there in `before`, once stable."""
    deadline = time.monotonic() + timeout_s
    while True:
        extra = {t.name for t in threading.enumerate()} - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.1)
