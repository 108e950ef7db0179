"""Disk transport: safetensors weights written atomically, read back by engine processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from rlsync.checkpoint_io import checkpoint_files
from rlsync.model_config import ModelConfig
from rlsync.transports import IntegrityError, TransportError
from rlsync.transports.disk import read_weights, read_weights_metadata, write_weights
from tests.rlsync.transports.test_transport_shm import (
    KillAt,
    error_report,
    join_all,
    make_tensors,
    mismatches,
    start,
    write_json,
)


def _reader(path: str, version: int, out: str) -> None:
    report: dict[str, Any] = {}
    try:
        got = dict(read_weights(path, verify=True, expect_version=version))
        report["bad"] = mismatches(got, make_tensors(version))
    except TransportError as e:
        report.update(error_report(e))
    write_json(out, report)


@pytest.mark.parametrize("readers", [1, 2])
def test_weights_arrive_bit_exact_in_reader_processes(tmp_path: Path, readers: int) -> None:
    path = tmp_path / "weights"
    stats = write_weights(path, make_tensors(3), 3, max_shard_bytes=64 << 10)
    assert len(checkpoint_files(path)) > 1 and stats.buckets == len(make_tensors(3))
    outs = [str(tmp_path / f"reader{i}.json") for i in range(readers)]
    join_all([start(_reader, str(path), 3, out) for out in outs])
    for out in outs:
        assert json.loads(Path(out).read_text()) == {"bad": []}


def test_version_and_fingerprints_travel_in_the_metadata(tmp_path: Path) -> None:
    cfg = ModelConfig()
    write_weights(tmp_path / "w", make_tensors(1), 7, cfg=cfg, metadata={"step": "12"})
    version, prints = read_weights_metadata(tmp_path / "w")
    assert version == 7 and set(prints) == set(make_tensors(1))
    assert ModelConfig.from_dir(tmp_path / "w") == cfg
    with pytest.raises(TransportError, match="version 7, expected 8"):
        read_weights(tmp_path / "w", expect_version=8)
    write_weights(tmp_path / "plain", make_tensors(1), 1, fingerprints=False)
    with pytest.raises(IntegrityError, match="no fingerprints"):
        read_weights(tmp_path / "plain", verify=True)
    assert mismatches(dict(read_weights(tmp_path / "plain")), make_tensors(1)) == []


def _flip_byte_of(path: Path, name: str) -> None:
    """Flip one payload byte of tensor `name` in its safetensors file, in place."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            if name not in f.keys():
                continue
        raw = file.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        begin, _ = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
        at = 8 + header_len + begin
        file.write_bytes(raw[:at] + bytes([raw[at] ^ 0x04]) + raw[at + 1 :])
        return
    raise AssertionError(f"{name} not found")


def test_verify_names_the_corrupted_tensor(tmp_path: Path) -> None:
    write_weights(tmp_path / "w", make_tensors(2), 2, max_shard_bytes=64 << 10)
    _flip_byte_of(tmp_path / "w", "layers.0.ids")
    unverified = dict(read_weights(tmp_path / "w"))
    assert mismatches(unverified, make_tensors(2)) == ["layers.0.ids"]
    with pytest.raises(IntegrityError, match="layers.0.ids") as info:
        dict(read_weights(tmp_path / "w", verify=True))
    assert info.value.name == "layers.0.ids"


def _dying_writer(path: str, victim: str) -> None:
    write_weights(path, KillAt(make_tensors(2), victim), 2, max_shard_bytes=64 << 10)


def test_writer_killed_midway_leaves_the_previous_weights(tmp_path: Path) -> None:
    path = tmp_path / "w"
    write_weights(path, make_tensors(1), 1, max_shard_bytes=64 << 10)
    writer = start(_dying_writer, str(path), "layers.1.mlp")  # in a later shard
    join_all([writer])
    assert writer.exitcode == -signal.SIGKILL
    assert (
        mismatches(dict(read_weights(path, verify=True, expect_version=1)), make_tensors(1)) == []
    )
    write_weights(path, make_tensors(2), 2)  # a later push replaces it whole
    assert (
        mismatches(dict(read_weights(path, verify=True, expect_version=2)), make_tensors(2)) == []
    )


def test_missing_directory_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="nowhere"):
        read_weights(tmp_path / "nowhere")
