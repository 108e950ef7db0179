"""Run inside a private mount namespace whose /dev/shm is a 4 MiB tmpfs (see
test_faults_pusher.py): a sender that fits works, one that does not must fail with a clear
error instead of dying of SIGBUS, and no segment may be left behind. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

from rlsync.transports.shm import ShmSender


def attempt(nbytes: int) -> str:
    try:
        sender = ShmSender(capacity_bytes=nbytes, num_engines=1)
    except Exception as exc:  # report whatever it is; the test judges it
        return f"{type(exc).__name__}: {exc}"
    sender.data.fill_(7)  # touch every page: a lazily failed allocation would SIGBUS here
    sender.close()
    return "ok"


def main() -> int:
    fits, too_big = attempt(2 << 20), attempt(8 << 20)
    print(json.dumps({"fits": fits, "too_big": too_big, "left": sorted(os.listdir("/dev/shm"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
