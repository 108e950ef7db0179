"""The facts a push needs about a sharded parameter: which dim-0 rows of the full tensor a
rank holds (`dim0_shard`), how torch splits them over the ranks (`row_splits`), a rank's own
rows as a push assigns them (`local_rows`), and the gather people use today
(`full_tensors`). FSDP2 shards every parameter on dim 0 (rank r holds rows [offset, offset +
local rows), in chunks of ceil(n / world_size) rows), so each rank's part of a row-major
tensor is one contiguous byte range of the engine's store. Knows DTensors only: nothing of
FSDP's training wrappers, engines or PPO.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


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
