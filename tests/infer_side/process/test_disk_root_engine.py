"""A real engine process started with --disk-root (issue 19, cause 9): disk updates whose
path resolves outside it (elsewhere, `..`, a symlink pointing out) are refused by name with
nothing changed, and the engine keeps serving; a checkpoint under it loads bit-exactly.
Before the fix every one of those paths was loaded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_side.process.client import EngineClient, launch_engine
from rlsync.checkpoint_io import iter_checkpoint_tensors
from rlsync.plan.buckets import tensor_fingerprint
from rlsync.wire.protocol import UpdateDone, UpdateWeightsFromDisk, failed, is_final
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("disk-root")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    return {
        "root": root,
        "start": make_hf_checkpoint(base, seed=1),
        "outside": Path(shutil.copytree(make_hf_checkpoint(base, seed=2), outside)),
        "inside": Path(shutil.copytree(outside, root / "v1")),
    }


@pytest.fixture(scope="module")
def engine(dirs: dict[str, Path]) -> Iterator[EngineClient]:
    with launch_engine(
        dirs["start"], kv_tokens=256, threads=1, call_timeout_s=60, disk_root=dirs["root"]
    ) as client:
        yield client


def update(engine: EngineClient, path: str, version: int) -> UpdateDone:
    """Send a disk update; its final reply."""
    engine.rpc.send(UpdateWeightsFromDisk(path=path, weight_version=version, timeout_s=60))
    reply = engine.rpc.recv(60)
    while not is_final(reply):
        reply = engine.rpc.recv(60)
    assert isinstance(reply, UpdateDone), reply
    return reply


def state(engine: EngineClient) -> tuple:
    tokens = [o.output_ids for o in engine.generate([[1, 2, 3], [5, 4]])]
    return engine.fingerprints(), tokens


def test_the_engine_reports_its_disk_root(engine, dirs):
    assert engine.info().disk_root == os.path.realpath(dirs["root"])


REFUSED = {
    "outside": lambda d: str(d["outside"]),
    "dot-dot": lambda d: f"{d['root']}/../outside",
    "symlink": lambda d: _link(d["root"] / "link", d["outside"]),
}


def _link(link: Path, target: Path) -> str:
    if not link.is_symlink():
        link.symlink_to(target)
    return str(link)


@pytest.mark.parametrize("where", REFUSED.values(), ids=REFUSED.keys())
def test_a_path_resolving_outside_the_root_is_refused_and_nothing_changes(engine, dirs, where):
    before = state(engine)
    version = engine.info().weight_version
    path = where(dirs)
    done = update(engine, path, version + 1)
    assert not done.success and done.weight_version == version
    message = failed(done) or ""
    assert f"OutsideRoot: path '{path}': " in message, message
    assert f"is outside this engine's disk root {os.path.realpath(dirs['root'])}" in message
    assert not done.live_touched and not done.weights_incomplete
    assert engine.info().weight_version == version
    assert state(engine) == before


def test_a_checkpoint_under_the_root_loads_bit_exactly(engine, dirs):
    version = engine.info().weight_version + 1
    done = update(engine, str(dirs["inside"]), version)
    assert done.success, failed(done)
    prints = engine.fingerprints()
    assert prints.weight_version == version
    want = {n: tensor_fingerprint(t) for n, t in iter_checkpoint_tensors(dirs["inside"])}
    assert prints.fingerprints == {n: want[n] for n in prints.fingerprints}
