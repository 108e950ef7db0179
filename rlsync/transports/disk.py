"""Disk transport: weights as a safetensors checkpoint directory (also how a checkpoint on
disk is pushed to engines).

The files are written by `rlsync.checkpoint_io` (Hugging Face layout, atomic: temp dir +
rename, so an engine sees the old weights, the new ones, or none). Two metadata keys ride in
every shard's header: the weight version and a JSON map name -> fingerprint of each
tensor's bytes, which `read_weights(verify=True)` checks tensor by tensor. Only safetensors
is ever read. Nothing here knows either side's model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rlsync.checkpoint_io import (
    INDEX_FILE,
    CheckpointError,
    checkpoint_files,
    checkpoint_specs,
    iter_checkpoint_tensors,
    read_checkpoint_metadata,
    write_checkpoint,
)
from rlsync.model_config import ModelConfig
from rlsync.plan import delta
from rlsync.plan.buckets import dtype_from_name, tensor_fingerprint, tensor_nbytes
from rlsync.transports import IntegrityError, TransferStats, TransportError, TransportTimeout, base
from rlsync.wire.protocol import BucketPlan, UpdateWeightsFromDisk

VERSION_KEY = "rlsync_weight_version"
FINGERPRINTS_KEY = "rlsync_fingerprints"


class _WeightsOnly:
    """Stands in for a ModelConfig when only weights are pushed: config.json says so."""

    def to_hf_dict(self) -> dict[str, str]:
        return {"rlsync": "weights only; the model config travels separately"}


def write_weights(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    version: int,
    *,
    cfg: ModelConfig | None = None,
    fingerprints: bool = True,
    max_shard_bytes: int = 2 << 30,
    metadata: Mapping[str, str] | None = None,
) -> TransferStats:
    """Write `tensors` as a checkpoint at `path` (replacing any), tagged with `version`.

    With `cfg`, config.json is the model's (a loadable Hugging Face checkpoint); without,
    it only marks the directory as weights-only. With `fingerprints`, each tensor's fingerprint goes into the metadata for
    `read_weights(verify=True)`. `metadata` adds str -> str entries of the caller's.
    """
    t0 = time.perf_counter()
    stats = TransferStats(
        nbytes=sum(t.numel() * t.element_size() for t in tensors.values()), buckets=len(tensors)
    )
    meta = {**(metadata or {}), VERSION_KEY: str(int(version))}
    if fingerprints:
        t = time.perf_counter()
        meta[FINGERPRINTS_KEY] = json.dumps(
            {name: f"{tensor_fingerprint(x) & (2**64 - 1):016x}" for name, x in tensors.items()}
        )
        stats.add("fingerprint", time.perf_counter() - t)
    t = time.perf_counter()
    try:
        write_checkpoint(
            path,
            cfg or _WeightsOnly(),
            tensors,  # type: ignore[arg-type]
            max_shard_bytes=max_shard_bytes,
            metadata=meta,
        )
    except CheckpointError as e:
        raise TransportError(f"disk: cannot write weights to {path}: {e}") from e
    stats.add("write", time.perf_counter() - t)
    stats.seconds = time.perf_counter() - t0
    return stats


def read_weights_metadata(path: str | Path) -> tuple[int | None, dict[str, str]]:
    """(weight version or None, name -> fingerprint hex) written by `write_weights`."""
    try:
        meta = read_checkpoint_metadata(path)
        version = int(meta[VERSION_KEY]) if VERSION_KEY in meta else None
        prints = json.loads(meta[FINGERPRINTS_KEY]) if FINGERPRINTS_KEY in meta else {}
    except (CheckpointError, ValueError) as e:
        raise TransportError(f"disk: unreadable weights metadata in {path}: {e}") from e
    if not isinstance(prints, dict) or not all(isinstance(v, str) for v in prints.values()):
        raise TransportError(f"disk: {path}: {FINGERPRINTS_KEY} must map names to hex strings")
    return version, prints


def read_weights(
    path: str | Path, *, verify: bool = False, expect_version: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor at `path`, file by file, read lazily; the
    metadata is read and checked at once.

    With `verify`, each tensor's fingerprint must match the one written with it
    (IntegrityError names the tensor) and every fingerprinted tensor must be present.
    `expect_version` raises TransportError when the files carry another version.
    """
    version, prints = read_weights_metadata(path)
    if expect_version is not None and version != expect_version:
        raise TransportError(
            f"disk: {path} holds weight version {version}, expected {expect_version}"
        )
    if verify and not prints:
        raise IntegrityError(f"disk: {path} carries no fingerprints to verify")
    return _iter_verified(path, prints if verify else None)


def _iter_verified(
    path: str | Path, prints: dict[str, str] | None
) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    try:
        for name, tensor in iter_checkpoint_tensors(path):
            if prints is not None:
                _check(path, name, tensor, prints)
                seen.add(name)
            yield name, tensor
    except CheckpointError as e:
        raise TransportError(f"disk: cannot read weights from {path}: {e}") from e
    missing = sorted(set(prints) - seen) if prints is not None else []
    if missing:
        raise IntegrityError(
            f"disk: {path}: {len(missing)} fingerprinted tensors missing, e.g. {missing[:3]}",
            name=missing[0],
        )


def _check(path: str | Path, name: str, tensor: torch.Tensor, prints: dict[str, str]) -> None:
    expected = prints.get(name)
    got = f"{tensor_fingerprint(tensor) & (2**64 - 1):016x}"
    if expected != got:
        raise IntegrityError(
            f"disk: {path}: tensor {name!r} fingerprint {got} != written {expected}", name=name
        )


# ---------------------------------------------------------------- the two halves


class Sender(base.Sender):
    """Trainer half: writes each version's files in `prepare` (only the newest directory is
    kept); the engines read them after the announcement, so `send` moves nothing."""

    kind = "disk"
    encodes_before_announce = True

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.version = 0
        self.root = Path(self.cfg.disk_dir) if self.cfg.disk_dir else self.work_dir / "weights"
        self.current: Path | None = None
        self.model_cfg: ModelConfig | None = getattr(self.engines, "model_cfg", None)

    def _write_full(self, plan: BucketPlan, tensors: base.Tensors, version: int) -> None:
        dtypes = {s.name: dtype_from_name(s.dtype) for b in plan.buckets for s in b.tensors}
        converted = {n: t.to(dtypes[n]) for n, t in tensors.items()}
        self._publish(write_weights, self.root / f"v{version}", converted, cfg=self.model_cfg)

    def _publish(self, write: Any, path: Path, tensors: base.Tensors, **kwargs: Any) -> None:
        kwargs.setdefault("fingerprints", self.cfg.verify)
        write(path, tensors, self.version, **kwargs)
        if self.current is not None and self.current != path:
            shutil.rmtree(self.current, ignore_errors=True)
        self.current = path

    def prepare(
        self, plan: BucketPlan, tensors: base.Tensors, version: int, kind: base.PushKind
    ) -> None:
        self.version = version
        if not kind.payloads:  # a payload push writes its files in send_encoded instead
            self._write_full(plan, tensors, version)

    def announce(self, engine: str, update: base.Announce) -> UpdateWeightsFromDisk:
        if self.current != self.root / f"v{self.version}":  # never name an older push's files
            raise TransportError(f"disk: no files written for version {self.version}")
        fields = dict(update.fields)
        if fields.get("delta") is not None:  # a disk update has no plan field: it rides here
            fields["delta"] = dataclasses.replace(
                fields["delta"], plan_id=update.plan_id, plan=update.plan
            )
        return UpdateWeightsFromDisk(path=str(self.current), **fields)

    def send(self, plan: BucketPlan, tensors: base.Tensors, accepted: list[str]) -> None:
        """The files were written in prepare; each engine reads them itself."""

    def send_encoded(self, plan: BucketPlan, encode: base.Encode, accepted: list[str]) -> None:
        """One safetensors file of uint8 tensors `delta.000000`, ... (header + body each),
        written before the announcement; each engine reads it itself."""
        payloads = {}
        for g in range(len(plan.buckets)):
            p = encode(g)
            payloads[payload_name(g)] = torch.cat([p.header, p.body])
        self._publish(write_weights, self.root / f"v{self.version}", payloads, fingerprints=False)


class OutsideRoot(ValueError):
    """A disk update names a path that resolves outside the engine's disk root."""


def default_disk_root() -> Path:
    """The root of an engine given none: the system temp directory (resolved), where every
    pusher makes its work directory unless told otherwise (`rlsync push`, the bench, tests'
    tmp dirs). Never the user's home, a model directory, /etc, /proc or /dev."""
    return Path(os.path.realpath(tempfile.gettempdir()))


def disk_root(root: str | os.PathLike | None) -> Path:
    """`root` resolved (realpath) and checked to be a directory; None: `default_disk_root`.
    Raises ValueError naming it, so an engine with a bad --disk-root refuses to start."""
    if root is None:
        return default_disk_root()
    resolved = Path(os.path.realpath(root))
    if not resolved.is_dir():
        raise ValueError(f"disk_root {str(root)!r}: not a directory")
    return resolved


def resolve_under(root: Path, path: str) -> Path:
    """`path` resolved (realpath: `..` and symlinks count), and every file a load of it
    reads (its index and safetensors files, each resolved too) checked to lie under `root`
    and to be a regular file. Raises OutsideRoot naming the path and the root, before a byte
    is read: a client cannot make the engine load (or block on) anything else."""
    try:
        real = Path(os.path.realpath(path))
    except (ValueError, OSError) as exc:  # an embedded NUL, say
        raise OutsideRoot(f"path {path!r}: cannot be resolved ({exc})") from None
    _check_under(root, path, real)
    index = real / INDEX_FILE
    files = [index] if os.path.lexists(index) else []
    try:
        files += checkpoint_files(real)
    except CheckpointError:
        pass  # no files to read: the load itself refuses, naming what is missing
    for file in files:
        _check_under(root, path, Path(os.path.realpath(file)), regular=True)
    return real


def _check_under(root: Path, path: str, real: Path, regular: bool = False) -> None:
    if real != root and root not in real.parents:
        raise OutsideRoot(
            f"path {path!r}: {real} is outside this engine's disk root {root} "
            "(set it with --disk-root / engine.disk_root)"
        )
    if regular and real.exists() and not stat.S_ISREG(real.stat().st_mode):
        raise OutsideRoot(f"path {path!r}: {real} is not a regular file")


class Receiver(base.Receiver):
    """Engine half: reads the named directory tensor by tensor into the writer, within the
    update's `timeout_s` (a slow disk fails the update instead of writing on forever).
    Only paths under `root` (`disk_root`) are read; anything else is refused by name."""

    kind = "disk"

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = disk_root(root)

    def check(
        self, msg: UpdateWeightsFromDisk, plan: BucketPlan | None, weights: base.WeightStore
    ) -> int:
        path = resolve_under(self.root, msg.path)
        if msg.delta is not None:
            assert plan is not None
            return _check_payload_files(str(path), plan)
        specs = checkpoint_specs(path)
        weights.validate(specs, complete=True)
        return sum(tensor_nbytes(d, s) for _, d, s in specs)

    def receive(
        self, msg: UpdateWeightsFromDisk, plan: BucketPlan | None, writer: base.WeightWriter
    ) -> None:
        deadline = time.monotonic() + msg.timeout_s
        checked = msg.verify and msg.delta is None  # payloads carry their own checks
        path = resolve_under(self.root, msg.path)  # again: it may have changed since check
        for name, tensor in read_weights(path, verify=checked):
            if time.monotonic() > deadline:
                raise TransportTimeout(f"disk: {msg.path} not read within {msg.timeout_s:.1f}s")
            if msg.delta is not None:
                assert plan is not None
                g = int(name.removeprefix("delta."))
                delta.apply_region(g, plan.buckets[g], tensor, writer)
            else:
                writer.write(name, tensor)


def payload_name(g: int) -> str:
    """The tensor holding bucket g's delta payload in a delta update's file."""
    return f"delta.{g:06d}"


def _check_payload_files(path: str, plan: BucketPlan) -> int:
    """A delta update's files hold exactly one uint8 payload per bucket of `plan`, each no
    larger than that bucket's largest payload."""
    specs = {name: (dtype, shape) for name, dtype, shape in checkpoint_specs(path)}
    wire = delta.wire_plan(plan)
    want = {payload_name(g) for g in range(len(plan.buckets))}
    if set(specs) != want:
        extra, missing = sorted(set(specs) - want), sorted(want - set(specs))
        raise ValueError(f"disk delta {path}: unexpected {extra[:3]}, missing {missing[:3]}")
    total = 0
    for g, bucket in enumerate(wire.buckets):
        dtype, shape = specs[payload_name(g)]
        if dtype != "uint8" or len(shape) != 1 or shape[0] > bucket.nbytes:
            raise ValueError(f"disk delta {path}: {payload_name(g)} is {dtype}{list(shape)}")
        total += shape[0]
    return total
