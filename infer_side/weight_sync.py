"""Engine side of weight sync (placeholder until the sync lands): every weight message fails."""

from __future__ import annotations

from typing import Any

from rlsync.protocol import Message, Result


class WeightSync:
    """Handles InitWeightsGroup, DestroyWeightsGroup, UpdateWeights* and GetWeightsFingerprint."""

    def __init__(self, core: Any):
        self.core = core

    def process(self, msg: Message) -> list[Message]:
        return [Result(request_id=msg.request_id, success=False,
                       message=f"{type(msg).__name__}: weight sync not implemented yet")]

    def poll(self) -> list[Message]:
        """Replies of updates that finished since the last call (shadow/deferred updates)."""
        return []

    def busy(self) -> bool:
        return False
