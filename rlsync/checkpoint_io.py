"""Checkpoint files on disk: write and read a Hugging Face-style safetensors checkpoint.

A checkpoint is a directory holding `config.json` and the weights as safetensors, laid out
the way `transformers.save_pretrained` does it: one `model.safetensors`, or several
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Writes are
atomic (a temporary sibling directory renamed into place), so a reader sees the old
checkpoint, the new one, or none, never half of one. Only safetensors is ever read: no
pickle. This module knows nothing about either side's model or how it lays out tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlsync.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT_KEY = "format"  # reserved metadata key; transformers requires format=pt
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


class CheckpointError(ValueError):
    """A checkpoint we cannot read or write; the message names the file or tensor."""


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int = 2 << 30,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write config.json and the tensors as safetensors shards into `path`, atomically.

    Each tensor is copied to a contiguous CPU tensor of its own storage (views, strided and
    tied tensors are all fine). `metadata` (str -> str) goes into every shard's header and
    is returned by `read_checkpoint_metadata`. An existing checkpoint at `path` is replaced.
    """
    path = Path(path)
    meta = _checked_metadata(metadata)
    shards = _plan_shards(tensors, max_shard_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True))
        _write_shards(tmp, tensors, shards, meta)
        _fsync_dir(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checked_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(f"metadata {key!r}: keys and values must be str, got {value!r}")
        if key == FORMAT_KEY:
            raise CheckpointError(f"metadata {key!r}: reserved key")
    meta[FORMAT_KEY] = "pt"
    return meta


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Order-preserving greedy split; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    if not tensors:
        raise CheckpointError("no tensors to write")
    shards: list[list[str]] = [[]]
    used = 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name!r}: expected a str name and a torch.Tensor")
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """File names transformers uses for `num_shards` shards."""
    if num_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _write_shards(
    tmp: Path, tensors: Mapping[str, torch.Tensor], shards: list[list[str]], meta: dict[str, str]
) -> None:
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for file, names in zip(files, shards, strict=True):
        # A fresh CPU copy per tensor: contiguous, and never sharing storage with another.
        part = {n: tensors[n].detach().to("cpu", copy=True).contiguous() for n in names}
        save_file(part, str(tmp / file), metadata=meta)
        _fsync_file(tmp / file)
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(names, file))
        del part
    if len(files) > 1:
        index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        _fsync_file(directory)
    except OSError:  # some filesystems refuse fsync on a directory; the data is synced already
        pass


def _move_into_place(tmp: Path, path: Path) -> None:
    """rename(2) is atomic; an existing checkpoint is first moved aside, then removed."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "ckpt")
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's, else every *.safetensors sorted."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(_read_index(index).values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [path / f for f in files]


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: unreadable index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
        for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map names to local *.safetensors files")
    return weight_map


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for every tensor of the checkpoint, file by file.

    With an index, each file must hold exactly the names the index gives it. A missing,
    truncated or corrupt file raises CheckpointError naming the file.
    """
    path = Path(path)
    files = checkpoint_files(path)
    index = path / INDEX_FILE
    weight_map = _read_index(index) if index.is_file() else None
    seen: set[str] = set()
    for file in files:
        for name, tensor in _iter_file(file, weight_map):
            if name in seen:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one file")
            seen.add(name)
            yield name, tensor


def _iter_file(file: Path, weight_map: dict[str, str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = list(f.keys())
            if weight_map is not None:
                _check_against_index(file, names, weight_map)
            for name in names:
                yield name, f.get_tensor(name)
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e


def _check_against_index(file: Path, names: list[str], weight_map: dict[str, str]) -> None:
    listed = {n for n, f in weight_map.items() if f == file.name}
    missing, extra = sorted(listed - set(names)), sorted(set(names) - listed)
    if missing or extra:
        raise CheckpointError(
            f"{file}: does not match the index (missing {missing[:3]}, not in index {extra[:3]})"
        )


def read_checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The metadata given to `write_checkpoint` (from the first file's header), less `format`."""
    file = checkpoint_files(path)[0]
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except _READ_ERRORS as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e
    meta.pop(FORMAT_KEY, None)
    return meta


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def checkpoint_specs(path: str | Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) of every tensor, from the file headers alone (no tensor is
    read), so a receiver can validate a whole checkpoint before loading any of it."""
    specs = []
    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), part.get_dtype())
                    specs.append((name, dtype, tuple(part.get_shape())))
        except _READ_ERRORS as e:
            raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e
    return specs
