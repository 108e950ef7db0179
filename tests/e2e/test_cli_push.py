"""`rlsync push` from the command line: after pushing a checkpoint to a running engine,
`rlsync generate --endpoint` prints exactly what a fresh engine loaded from that checkpoint
prints (`rlsync generate --model`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infer_side.client import launch_engine
from tests.checkpoints import make_hf_checkpoint


def rlsync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsync.cli", *args], capture_output=True,
                          text=True, timeout=180)


def generate(*target: str) -> list[dict]:
    out = rlsync("generate", *target, "--input-ids", "1,2,3,4", "--input-ids", "9,8,7",
                 "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return make_hf_checkpoint(root, seed=11), make_hf_checkpoint(root, seed=12)


@pytest.mark.parametrize("transport", ["broadcast", "ipc", "disk"])
def test_cli_push_then_generate_matches_fresh_engine(checkpoints, transport):
    start, target = checkpoints
    fresh = generate("--model", str(target))
    with launch_engine(start, kv_tokens=256, threads=1) as engine:
        before = generate("--endpoint", engine.endpoint)
        assert [o["output_ids"] for o in before] != [o["output_ids"] for o in fresh]
        pushed = rlsync("push", "--checkpoint", str(target), "--endpoint", engine.endpoint,
                        "--transport", transport, "--version", "3", "--verify", "--json")
        assert pushed.returncode == 0, pushed.stderr
        report = json.loads(pushed.stdout)
        assert report["failed"] == [] and report["version"] == 3
        assert report["engines"]["engine0"]["weight_version"] == 3
        after = generate("--endpoint", engine.endpoint)
    assert [o["output_ids"] for o in after] == [o["output_ids"] for o in fresh]
    assert [o["weight_version"] for o in after] == [3, 3]


def test_cli_push_refuses_an_old_version(checkpoints):
    start, target = checkpoints
    with launch_engine(start, kv_tokens=256, threads=1) as engine:
        pushed = rlsync("push", "--checkpoint", str(target), "--endpoint", engine.endpoint,
                        "--version", "0")
        assert pushed.returncode == 1
        assert "not newer" in pushed.stderr
        assert engine.info()["weight_version"] == 0
