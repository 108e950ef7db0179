"""Things on disk and in /dev/shm that hostile weight updates point at: missing and garbage
checkpoint directories, a pickle checkpoint, garbage and never-published shm segments.

None of them holds a checkpoint the engine could accept: every disk target has a wrong
name, dtype, shape or byte, so a fuzzed update can never change the engine's weights.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlsync.transports.control import Segment, new_segment_name
from rlsync.wire.protocol import CudaShare, IpcBuffer


@dataclass
class Targets:
    """Paths and shm descriptors for the fuzz; `close()` removes the segments."""

    disk_paths: list[str]
    buffers: list[IpcBuffer]
    segments: list[Segment] = field(default_factory=list)

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
        self.segments.clear()


def make_targets(root: Path, specs: dict[str, tuple[str, tuple[int, ...]]]) -> Targets:
    """Build every target under `root` for a model whose tensors are `specs`."""
    root.mkdir(parents=True, exist_ok=True)
    disk = [
        str(root / "missing"),
        str(root / "not-a-dir.txt"),
        "/",
        "",
        "\x00bad",
        "x" * 4000,
        *_bad_checkpoints(root, specs),
    ]
    (root / "not-a-dir.txt").write_text("hello")
    segments = [_garbage_segment(64), _garbage_segment(4096)]
    buffers = _bad_buffers(segments)
    return Targets(disk_paths=disk, buffers=buffers, segments=segments)


def _bad_checkpoints(root: Path, specs: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Directories that look like checkpoints but must each be refused."""
    names = list(specs)
    out = []

    def ckpt(
        name: str,
        tensors: dict[str, torch.Tensor] | None = None,
        raw: bytes | None = None,
        file: str = "model.safetensors",
    ) -> None:
        d = root / name
        d.mkdir(exist_ok=True)
        if tensors is not None:
            save_file(tensors, str(d / file))
        if raw is not None:
            (d / file).write_bytes(raw)
        out.append(str(d))

    full = {n: torch.zeros(s, dtype=getattr(torch, dt)) for n, (dt, s) in specs.items()}
    ckpt("garbage", raw=os.urandom(1000))
    ckpt("empty-file", raw=b"")
    ckpt("huge-header", raw=struct.pack("<Q", 1 << 62) + b"{}")
    ckpt("header-lies", raw=_lying_header(names[0], specs[names[0]]))
    ckpt("pickle-bin", raw=b"\x80\x04K\x01.", file="pytorch_model.bin")
    ckpt("unknown-name", {**full, "model.layers.99.mlp.up_proj.weight": torch.zeros(2)})
    ckpt("missing-one", {n: t for n, t in full.items() if n != names[-1]})
    ckpt("wrong-dtype", {n: t.double() if i == 0 else t for i, (n, t) in enumerate(full.items())})
    ckpt(
        "wrong-shape", {n: torch.zeros(3) if i == 1 else t for i, (n, t) in enumerate(full.items())}
    )
    truncated = root / "truncated"
    ckpt("truncated", full)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    bad_index = root / "bad-index"
    ckpt("bad-index", full)
    (bad_index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {names[0]: "../../etc/passwd.safetensors"}})
    )
    return out


def _lying_header(name: str, spec: tuple[str, tuple[int, ...]]) -> bytes:
    """A safetensors header whose offsets run far past the end of the file."""
    header = json.dumps(
        {name: {"dtype": "F32", "shape": list(spec[1]), "data_offsets": [0, 1 << 40]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 16


def _garbage_segment(nbytes: int) -> Segment:
    seg = Segment(new_segment_name("fuzz"), nbytes, create=True)
    assert seg.mm is not None
    seg.mm[:] = os.urandom(nbytes)
    return seg


def _bad_buffers(segments: list[Segment]) -> list[IpcBuffer]:
    """Descriptors naming segments that do not exist, garbage ones, or impossible names."""
    ghost = f"rlsync-{os.getpid()}-{'0' * 12}-ghost"
    real = segments[1].name
    return [
        IpcBuffer(name=ghost, control_name=ghost + "-ctl", nbytes=1 << 20),
        IpcBuffer(name=real, control_name=segments[0].name, nbytes=4096),
        IpcBuffer(name=real, control_name=real, nbytes=4096, num_slots=3, slot_bytes=512),
        IpcBuffer(name="../../etc/passwd", control_name="..", nbytes=10),
        IpcBuffer(name="a/b", control_name="", nbytes=0),
        IpcBuffer(name=real, control_name=segments[0].name, nbytes=1 << 40, engine_index=4095),
        IpcBuffer(
            kind="cuda",
            name=ghost,
            control_name=ghost,
            nbytes=64,
            cuda=CudaShare(handle=b"\x01" * 64),
        ),
    ]
