"""`rlsync push` from the command line: after pushing a checkpoint to a running engine,
`rlsync generate --endpoint` prints exactly what a fresh engine loaded from that checkpoint
prints (`rlsync generate --model`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from infer_side.process.client import launch_engine
from rlsync.checkpoint_io import iter_checkpoint_tensors, write_checkpoint
from rlsync.config import SyncConfig
from rlsync.model_config import ModelConfig
from tests.checkpoints import make_hf_checkpoint
from trainer_side.sync.pusher import WeightPusher


def rlsync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlsync.cli", *args], capture_output=True, text=True, timeout=180
    )


def generate(*target: str) -> list[dict]:
    out = rlsync(
        "generate",
        *target,
        "--input-ids",
        "1,2,3,4",
        "--input-ids",
        "9,8,7",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return make_hf_checkpoint(root, seed=11), make_hf_checkpoint(root, seed=12)


@pytest.fixture(scope="module")
def fresh(checkpoints):
    """What a fresh engine loaded from the target checkpoint generates."""
    return [o["output_ids"] for o in generate("--model", str(checkpoints[1]))]


@pytest.fixture(scope="module")
def engine(checkpoints):
    with launch_engine(checkpoints[0], kv_tokens=256, threads=1) as client:
        yield client


@pytest.mark.parametrize("version, transport", [(1, "broadcast"), (3, "ipc"), (5, "disk")])
def test_cli_push_then_generate_matches_fresh_engine(
    checkpoints, fresh, engine, version, transport, tmp_path
):
    start, target = checkpoints
    _reset_to(engine, start, version - 1, tmp_path)  # back to the start weights first
    assert [o["output_ids"] for o in generate("--endpoint", engine.endpoint)] != fresh
    pushed = rlsync(
        "push",
        "--checkpoint",
        str(target),
        "--endpoint",
        engine.endpoint,
        "--transport",
        transport,
        "--version",
        str(version),
        "--verify",
        "--json",
    )
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["failed"] == [] and report["version"] == version
    outcome = report["engines"]["engine0"]
    assert outcome["ok"] and outcome["weight_version"] == version
    assert outcome["weights_incomplete"] is False and outcome["bytes"] > 0
    assert 0 <= report["control_s"] <= report["seconds"]
    after = generate("--endpoint", engine.endpoint)
    assert [o["output_ids"] for o in after] == fresh
    assert [o["weight_version"] for o in after] == [version, version]


def test_cli_push_refuses_an_old_version(checkpoints, engine):
    current = engine.info().weight_version
    pushed = rlsync(
        "push",
        "--checkpoint",
        str(checkpoints[1]),
        "--endpoint",
        engine.endpoint,
        "--version",
        str(current),
    )
    assert pushed.returncode == 1
    assert "not newer" in pushed.stderr
    assert engine.info().weight_version == current


def _reset_to(engine, ckpt, version, work_dir) -> None:
    if version == 0:
        return
    pusher = WeightPusher(SyncConfig(), {"engine0": engine.endpoint}, work_dir)
    try:
        assert pusher.push(dict(iter_checkpoint_tensors(ckpt)), version).failed == []
    finally:
        pusher.close()


def test_cli_atomic_push_needs_shadow_and_then_commits(checkpoints, engine):
    current = engine.info().weight_version
    common = ["push", "--checkpoint", str(checkpoints[1]), "--endpoint", engine.endpoint]
    refused = rlsync(*common, "--version", str(current + 1), "--commit", "atomic")
    assert refused.returncode == 2
    assert "--commit: 'atomic' needs load_mode 'shadow'" in refused.stderr
    assert engine.info().weight_version == current  # refused before anything was sent
    pushed = rlsync(
        *common,
        "--version",
        str(current + 1),
        "--commit",
        "atomic",
        "--load-mode",
        "shadow",
        "--json",
    )
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["commit"] == "atomic" and report["aborted_because"] == {}
    assert report["engines"]["engine0"]["committed_at"] > 0
    assert report["commit_skew_s"] is None  # one engine: no skew to speak of
    assert engine.info().weight_version == current + 1


@pytest.fixture(scope="module")
def sparse_target(checkpoints, tmp_path_factory):
    """The start checkpoint with 1% of its elements changed: what a delta push is for."""
    start = checkpoints[0]
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, t in iter_checkpoint_tensors(start):
        flat = t.clone().reshape(-1)
        hit = torch.rand(flat.shape, generator=gen) < 0.01
        flat[hit] += 0.125
        tensors[name] = flat.reshape(t.shape)
    out = tmp_path_factory.mktemp("sparse") / "ckpt"
    write_checkpoint(out, ModelConfig.from_dir(start), tensors)
    return out, tensors


@pytest.mark.parametrize("transport", ["broadcast", "ipc"])
def test_cli_delta_push_sends_only_the_changes(
    checkpoints, sparse_target, engine, transport, tmp_path
):
    start = checkpoints[0]
    version = engine.info().weight_version + 2
    _reset_to(engine, start, version - 1, tmp_path)
    target, tensors = sparse_target
    pushed = rlsync(
        "push",
        "--checkpoint",
        str(target),
        "--delta",
        "--base-checkpoint",
        str(start),
        "--endpoint",
        engine.endpoint,
        "--transport",
        transport,
        "--version",
        str(version),
        "--json",
    )
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["delta"] == "delta" and report["failed"] == []
    assert 0 < report["wire_bytes"] < report["bytes"] / 10
    assert 0.005 < report["changed_fraction"] < 0.02
    pusher = WeightPusher(SyncConfig(), {"engine0": engine.endpoint}, tmp_path)
    try:
        assert pusher.mismatches(tensors) == {"engine0": []}
    finally:
        pusher.close()
    assert engine.info().weight_version == version


def test_cli_delta_push_refuses_a_base_the_engine_does_not_hold(checkpoints, sparse_target, engine):
    before = engine.fingerprints()
    pushed = rlsync(
        "push",
        "--checkpoint",
        str(sparse_target[0]),
        "--delta",
        "--base-checkpoint",
        str(checkpoints[1]),  # not what the engine holds
        "--endpoint",
        engine.endpoint,
        "--version",
        str(before.weight_version + 1),
    )
    assert pushed.returncode == 1
    assert "holds other bytes than the base" in pushed.stderr
    assert engine.fingerprints() == before


def _unreachable(tmp_path) -> dict:
    gone = f"ipc://{tmp_path}/gone.sock"
    return {
        "no such dir": (
            ["ipc:///no/such.sock"],
            "endpoint 'ipc:///no/such.sock': directory /no does not exist",
        ),
        "no socket": ([gone], f"no engine at {gone}: {tmp_path}/gone.sock does not exist"),
        "second of two": (
            ["ENGINE", gone],
            f"no engine at {gone}: {tmp_path}/gone.sock does not exist",
        ),
    }


@pytest.mark.parametrize("case", ["no such dir", "no socket", "second of two"])
def test_cli_push_to_an_endpoint_nothing_listens_on_fails_at_once(
    checkpoints, engine, tmp_path, case
):
    """Before: the push waited its whole --timeout (60 s) before "did not answer"."""
    endpoints, why = _unreachable(tmp_path)[case]
    args = [a for e in endpoints for a in ("--endpoint", engine.endpoint if e == "ENGINE" else e)]
    before = engine.info().weight_version
    start = time.monotonic()
    pushed = rlsync("push", "--checkpoint", str(checkpoints[1]), *args, "--version", "99")
    assert (pushed.returncode, pushed.stderr) == (2, f"error: cannot reach an engine: {why}\n")
    assert time.monotonic() - start < 30  # well before the default --timeout of 60 s
    assert engine.info().weight_version == before  # nothing was sent to the live one


def test_cli_disk_push_writes_under_the_engines_disk_root(checkpoints, fresh, tmp_path):
    """An engine started with --disk-root reads only under it: the push writes its files
    there (it asks the engine), and removes them afterwards."""
    root = tmp_path / "root"
    root.mkdir()
    with launch_engine(checkpoints[0], kv_tokens=256, threads=1, disk_root=root) as served:
        assert served.info().disk_root == str(root.resolve())
        pushed = rlsync(
            "push",
            "--checkpoint",
            str(checkpoints[1]),
            "--endpoint",
            served.endpoint,
            "--transport",
            "disk",
            "--version",
            "1",
            "--json",
        )
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout)["failed"] == []
        assert [o["output_ids"] for o in generate("--endpoint", served.endpoint)] == fresh
    assert list(root.iterdir()) == []
