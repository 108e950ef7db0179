"""What a trainer imports to push weights: open `pusher.py` first (`WeightPusher`). Beside it
the engine set it talks to (`engine_set`), the all-or-none round (`atomic_commit`), the
delta planner (`delta_push`), the report (`push_report`) and the FSDP sharded pusher
(`shard_push`). Imports the library only: never `trainer_side.rl`, never `infer_side`.
"""

from trainer_side.sync.push_report import PushError, PushReport
from trainer_side.sync.pusher import WeightPusher

__all__ = ["PushError", "PushReport", "WeightPusher"]
