"""FSDP2 sharding of the policy (the facts a push needs about a sharded parameter are in
`rlsync.transports.sharded.dim0`).

`shard_policy(policy, world_size, device)` applies `torch.distributed.fsdp.fully_shard` to
every decoder layer and then to the whole policy, over a 1-D device mesh of the default
process group (the trainer ranks only; gloo on CPU, nccl on GPU). Parameters become DTensors
sharded on dim 0: rank r holds rows [offset, offset + local rows) of each, where torch
splits dim 0 in chunks of ceil(n / world_size) rows, so with an uneven split the last ranks
hold fewer rows, or none.

Nothing here knows about engines, transports or PPO.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def shard_policy(policy: nn.Module, world_size: int, device: str) -> DeviceMesh:
    """Shard `policy` in place with FSDP2 over all ranks of the default process group.

    Each decoder layer is its own FSDP unit (its parameters are gathered for its forward and
    freed after), the root unit holds the embeddings, the final norm and the head. A tied
    head is the embedding's Parameter, so it is sharded once and stays tied.
    """
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world_size,))
    for layer in getattr(getattr(policy, "model", None), "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return mesh


def to_local_float(t: Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over DTensor grads) as a float."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)
