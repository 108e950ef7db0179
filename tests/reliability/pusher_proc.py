"""A trainer process that stops itself (SIGSTOP) in the middle of a push, after packing
its second bucket; the test decides when to SIGCONT it. Prints `STOPPING` before it stops
and one `RESULT {json}` line when the push ends (an error is expected, never a hang).

    python -m tests.reliability.pusher_proc ENDPOINT TRANSPORT LOAD_MODE VERSION CKPT TIMEOUT_S
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import rlsync.transports.broadcast as broadcast
import rlsync.transports.ipc as ipc
from rlsync.config import SyncConfig
from tests.e2e.sync_helpers import trainer_weights
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher


def stop_after_second_bucket() -> None:
    real, packed = ipc.pack_bucket, []

    def pack(bucket, tensors, out):  # noqa: ANN001 - same signature as pack_bucket
        real(bucket, tensors, out)
        packed.append(1)
        if len(packed) == 2:
            print("STOPPING", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
            print("CONTINUED", flush=True)

    broadcast.pack_bucket = ipc.pack_bucket = pack


def main() -> int:
    endpoint, transport, load_mode, version, ckpt, timeout_s = sys.argv[1:7]
    cfg = SyncConfig(
        transport=transport, load_mode=load_mode, bucket_mb=0.02, timeout_s=float(timeout_s)
    )
    pusher = WeightPusher(cfg, {"engine": endpoint}, f"/tmp/rlsync-stall-{os.getpid()}")
    stop_after_second_bucket()
    start = time.monotonic()
    try:
        report = pusher.push(trainer_weights(ckpt, int(version)), int(version))
        outcome = {"failed": report.failed, "summary": report.summary()}
    except PushError as exc:
        outcome = {"error": str(exc)}
    finally:
        pusher.close()
    outcome["seconds_after_start"] = time.monotonic() - start
    print("RESULT " + json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
