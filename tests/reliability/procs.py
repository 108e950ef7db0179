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

    @classmethod
    def steady(cls, pid: int, quiet_s: float = 0.5, timeout_s: float = 10.0) -> Snapshot:
        """A snapshot that held for `quiet_s` (a client that just left may still have a
        connection being closed)."""
        deadline = time.monotonic() + timeout_s
        last, since = cls.take(pid), time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            time.sleep(0.05)
            now = cls.take(pid)
            if now != last:
                last, since = now, time.monotonic()
        return last


def settled(pid: int, before: Snapshot, timeout_s: float = 10.0) -> Snapshot:
    """`before` once the process holds no more fds and threads than it did then (worker
    threads and sockets take a moment to go; an engine may also have let go of a buffer it
    held), else the last snapshot seen after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = Snapshot.take(pid)
        if (now.fds <= before.fds and now.threads <= before.threads) or time.monotonic() > deadline:
            return before if now.fds <= before.fds and now.threads <= before.threads else now
        time.sleep(0.1)


def local_threads_settled(before: set[str], timeout_s: float = 10.0) -> set[str]:
    """Names of this process's threads that were not there in `before`, once stable."""
    deadline = time.monotonic() + timeout_s
    while True:
        extra = {t.name for t in threading.enumerate()} - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.1)
