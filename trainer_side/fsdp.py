"""FSDP2 sharding of the policy, and the facts a push needs about a sharded parameter.

`shard_policy(policy, world_size, device)` applies `torch.distributed.fsdp.fully_shard` to
every decoder layer and then to the whole policy, over a 1-D device mesh of the default
process group (the trainer ranks only; gloo on CPU, nccl on GPU). Parameters become DTensors
sharded on dim 0: rank r holds rows [offset, offset + local rows) of each, where torch
splits dim 0 in chunks of ceil(n / world_size) rows, so with an uneven split the last ranks
hold fewer rows, or none.

`dim0_shard(t)` says which rows of the full tensor this rank holds; `full_tensors(named)`
is the gather people use today (`DTensor.full_tensor()`, a collective every rank must call).
Nothing here knows about engines, transports or PPO.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


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


@dataclass(frozen=True)
class Dim0Shard:
    """The rows [start, start + rows) of a full tensor that `local` holds on this rank."""

    start: int
    local: Tensor

    @property
    def rows(self) -> int:
        return self.local.shape[0] if self.local.dim() else 1


def dim0_shard(t: Tensor, rank: int) -> Dim0Shard | None:
    """This rank's part of `t`: its dim-0 rows for a Shard(0) DTensor; the whole tensor on
    rank 0 (None elsewhere) for a plain or replicated one, so exactly one rank writes it.
    Raises for placements a dim-0 row range cannot describe."""
    if not isinstance(t, DTensor):
        return Dim0Shard(0, t.detach()) if rank == 0 else None
    placements = tuple(t.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return Dim0Shard(0, t.to_local().detach()) if rank == 0 else None
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"placements {placements}: only a 1-D mesh sharded on dim 0 maps to row ranges"
        )
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
    start = offset[0] if t.dim() else 0
    return Dim0Shard(int(start), t.to_local().detach())


def row_splits(t: Tensor, world_size: int) -> list[int]:
    """Row boundaries of `t` over the ranks: rank r holds rows [b[r], b[r + 1]). A Shard(0)
    DTensor is split as torch.chunk splits it (chunks of ceil(rows / world_size) rows, the
    last ranks fewer or none); anything else is rank 0's whole (a 0-dim tensor is one row).
    Each rank checks its own part against this (`local_rows`)."""
    n = t.shape[0] if t.dim() else 1
    if isinstance(t, DTensor) and not all(isinstance(p, Replicate) for p in t.placements):
        chunk = -(-n // world_size)
        return [min(r * chunk, n) for r in range(world_size + 1)]
    return [0] + [n] * world_size


def local_rows(
    tensors: Mapping[str, Tensor], rows: Mapping[str, list[int]], rank: int
) -> dict[str, Tensor]:
    """name -> this rank's rows of each tensor it holds rows of, as `rows` assigns them;
    raises ValueError naming a tensor whose shard on this rank is other rows."""
    out = {}
    for name, bounds in rows.items():
        lo, hi = bounds[rank], bounds[rank + 1]
        if hi <= lo:
            continue
        shard = dim0_shard(tensors[name], rank)
        held = (shard.start, shard.start + shard.rows) if shard is not None else None
        if held != (lo, hi):
            raise ValueError(
                f"{name}: rank {rank} holds rows {held}, the push assigns [{lo}, {hi})"
            )
        assert shard is not None
        out[name] = shard.local
    return out


def full_tensors(
    named: Iterable[tuple[str, Tensor]], keep: bool = True
) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor), one parameter at a time: every rank must iterate all of them, in
    the same order (each `full_tensor()` is an all-gather). `keep=False` drops the gathered
    copy on return, for ranks that only take part in the collective."""
    for name, t in named:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, full.detach() if keep else full.new_empty(0)


def to_local_float(t: Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ over DTensor grads) as a float."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)
