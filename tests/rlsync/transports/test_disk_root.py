"""The disk transport reads only under the engine's disk root (issue 19, cause 9).

A path that resolves outside the root (`..`, a symlinked directory, a symlinked file inside
the checkpoint) is refused by name before a byte is read; so is a checkpoint file that is
not a regular file (a FIFO would block the engine). Before the fix any path was read.
The engine side's store is a fake (a dict of expected specs): this is the receiver alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from rlsync.config import ConfigError, EngineConfig
from rlsync.transports.disk import (
    OutsideRoot,
    Receiver,
    default_disk_root,
    disk_root,
    resolve_under,
    write_weights,
)
from rlsync.wire.protocol import UpdateWeightsFromDisk

pytestmark = pytest.mark.timeout(60)

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}


class FakeStore:
    """The engine's weights as the receiver sees them: what an update must carry."""

    def validate(self, items, complete: bool = True) -> None:
        got = {n: (d, tuple(s)) for n, d, s in items}
        assert got == {"a.weight": ("float32", (3, 4))}, got


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def checkpoint(where: Path) -> Path:
    write_weights(where, TENSORS, 1)
    return where


def check(receiver: Receiver, path: str | Path) -> int:
    return receiver.check(UpdateWeightsFromDisk(path=str(path)), None, FakeStore())


def test_a_checkpoint_under_the_root_is_accepted(root):
    ckpt = checkpoint(root / "runs" / "v1")
    assert check(Receiver(root), ckpt) == 48
    assert resolve_under(disk_root(root), str(ckpt)) == Path(os.path.realpath(ckpt))


def test_a_root_given_through_a_symlink_accepts_what_lies_under_its_target(root, tmp_path):
    (tmp_path / "link").symlink_to(root)
    ckpt = checkpoint(root / "v1")
    assert check(Receiver(tmp_path / "link"), tmp_path / "link" / "v1") == 48
    assert check(Receiver(tmp_path / "link"), ckpt) == 48


def test_a_path_outside_the_root_is_refused_by_name(root, tmp_path):
    outside = checkpoint(tmp_path / "elsewhere")
    with pytest.raises(OutsideRoot, match=rf"path '{outside}': .* outside this engine's disk"):
        check(Receiver(root), outside)


def test_a_sibling_whose_name_starts_like_the_root_is_outside_it(root, tmp_path):
    sibling = checkpoint(tmp_path / "root2" / "v1")
    with pytest.raises(OutsideRoot, match="outside this engine's disk root"):
        check(Receiver(root), sibling)


def test_dot_dot_out_of_the_root_is_refused(root, tmp_path):
    checkpoint(tmp_path / "elsewhere")
    sneaky = f"{root}/../elsewhere"
    with pytest.raises(OutsideRoot, match=rf"path '{sneaky}': {tmp_path}/elsewhere is outside"):
        check(Receiver(root), sneaky)


def test_a_symlink_in_the_root_pointing_out_is_refused(root, tmp_path):
    outside = checkpoint(tmp_path / "elsewhere")
    (root / "v1").symlink_to(outside)
    with pytest.raises(OutsideRoot, match=rf"path '{root}/v1': {outside} is outside"):
        check(Receiver(root), root / "v1")


def test_a_checkpoint_file_symlinked_out_of_the_root_is_refused(root, tmp_path):
    outside = checkpoint(tmp_path / "elsewhere")
    inside = root / "v1"
    inside.mkdir()
    (inside / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(OutsideRoot, match=rf"{outside}/model.safetensors is outside"):
        check(Receiver(root), inside)


def test_a_fifo_named_as_a_checkpoint_file_is_refused_without_blocking(root):
    inside = root / "v1"
    inside.mkdir()
    os.mkfifo(inside / "model.safetensors")  # opening it to read would block the engine
    with pytest.raises(OutsideRoot, match="model.safetensors is not a regular file"):
        check(Receiver(root), inside)


@pytest.mark.parametrize("path", ["", "\x00bad", "relative/dir"])
def test_odd_paths_are_refused_by_name(root, path):
    with pytest.raises(OutsideRoot, match="path "):
        check(Receiver(root), path)


def test_the_receive_checks_again_before_it_reads(root, tmp_path):
    """A directory swapped for a symlink between the accept and the read is refused too."""
    outside = checkpoint(tmp_path / "elsewhere")
    ckpt = checkpoint(root / "v1")
    receiver = Receiver(root)
    msg = UpdateWeightsFromDisk(path=str(ckpt))
    assert receiver.check(msg, None, FakeStore()) == 48
    os.rename(ckpt, root / "old")
    ckpt.symlink_to(outside)
    with pytest.raises(OutsideRoot, match="outside"):
        receiver.receive(msg, None, writer=None)  # type: ignore[arg-type]


def test_without_a_root_the_engine_reads_under_the_temp_dir_only(tmp_path):
    assert default_disk_root() == Path(os.path.realpath(tempfile.gettempdir()))
    assert Receiver().root == default_disk_root()
    assert check(Receiver(), checkpoint(tmp_path / "v1")) == 48  # pytest's tmp dirs are there
    with pytest.raises(OutsideRoot, match="outside this engine's disk root"):
        check(Receiver(), Path("/usr"))  # never under the temp dir (a checkout may be)


def test_a_root_that_is_not_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="disk_root .*missing.*: not a directory"):
        Receiver(tmp_path / "missing")
    with pytest.raises(ConfigError, match="engine.disk_root"):
        EngineConfig(disk_root="")
    assert EngineConfig(disk_root=str(tmp_path)).disk_root == str(tmp_path)
