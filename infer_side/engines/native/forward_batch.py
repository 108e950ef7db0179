"""What one model forward over the paged KV pool needs: the contract between scheduler and model.

The scheduler builds a ForwardBatch from its running requests; the model writes each new
token's K/V into `out_slots` and attends over `seq_slots`. Neither side knows the other's
internals: the model knows nothing of requests, the scheduler nothing of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """New tokens of B sequences, concatenated, and where their KV lives.

    KV pool tensors have shape [num_layers, num_slots, num_kv_heads, head_dim].
    """

    input_ids: torch.Tensor
    """[T] int64: the new tokens of every sequence, sequence after sequence."""
    positions: torch.Tensor
    """[T] int64: each new token's position in its sequence."""
    out_slots: torch.Tensor
    """[T] int64: KV slot that receives each new token's K and V."""
    seq_slots: list[torch.Tensor]
    """Per sequence: [seq_len] int64 slots of every token so far (cached prefix + new), in order."""
    new_lens: list[int]
    """Per sequence: how many of its tokens are new in this batch (sum == T)."""

    @property
    def batch_size(self) -> int:
        return len(self.new_lens)
