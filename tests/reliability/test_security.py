"""No pickle on any path that reads a socket, a file or an IPC message; ipc:// endpoints in
an owner-only directory; safetensors is the only checkpoint format loaded.

The scan covers every module of rlsync/, infer_side/ and trainer_side/; the one allowed
exception is the benchmark's pickle baseline, which exists to measure pickle-over-ZMQ.
The live tests send the engine a pickle whose unpickling would create a marker file.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
import zmq

from infer_side.engines.checkpoint import load_model
from rlsync.checkpoint_io import CheckpointError
from rlsync.wire.codec import decode
from rlsync.wire.endpoints import ipc_path
from rlsync.wire.protocol import Result, UpdateDone, UpdateWeightsFromDisk
from rlsync.wire.rpc import RpcClient
from tests.reliability.pickle_scan import scan_file, scan_source

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rlsync", "infer_side", "trainer_side")
ALLOWED = {Path("rlsync/bench/pickle_baseline.py")}


class Booby:
    """Unpickling this creates `path` (the proof that something unpickled it)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def payloads(marker: Path) -> list[bytes]:
    return [pickle.dumps(Booby(marker), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]


def test_payload_would_fire_if_unpickled(tmp_path):
    marker = tmp_path / "fired"
    pickle.loads(payloads(marker)[-1]).close()  # the trap works, so its absence means something
    assert marker.exists()


# ---------------------------------------------------------------- static scan


def test_no_pickle_torch_load_marshal_or_eval_in_the_packages():
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40
    findings = [hit for f in files if f.relative_to(ROOT) not in ALLOWED for hit in scan_file(f)]
    assert findings == []


def test_the_allowed_exception_is_exactly_the_pickle_baseline():
    baseline = ROOT / "rlsync/bench/pickle_baseline.py"
    if not baseline.exists():
        pytest.skip("the benchmark's pickle baseline is not in this checkout")
    assert scan_file(baseline), "the baseline no longer pickles: drop it from ALLOWED"


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.loads(x)",
        "from pickle import loads",
        "import cPickle",
        "import dill",
        "import cloudpickle",
        "import marshal\nmarshal.loads(b'')",
        "import torch\ntorch.load(f)",
        "from torch import load\nload(f)",
        "import torch as t\nt.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import numpy\nnumpy.load(f, **kw)",
        "eval('1')",
        "exec('x=1')",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.unsafe_load(s)",
        "sock.recv_pyobj()",
        "__import__('pickle')",
        "import importlib\nimportlib.import_module('dill')",
        "import shelve",
        "import torch\ntorch.jit.load(f)",
    ],
)
def test_scan_catches(source):
    assert scan_source(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import yaml\nyaml.safe_load(s)",
        "import msgpack\nmsgpack.unpackb(b)",
        "x.evaluate()",
        "from safetensors.torch import load_file",
        "import json\njson.loads(s)",
    ],
)
def test_scan_allows(source):
    assert scan_source(source) == [], source


# ---------------------------------------------------------------- live


def test_pickle_frames_are_refused_and_never_unpickled(engines, tmp_path):
    engine = engines["e0"]
    marker = tmp_path / "fired"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine.endpoint)
    try:
        for payload in payloads(marker):
            sock.send(payload)
            assert sock.poll(5000), "no reply to a pickle frame"
            reply = decode(sock.recv())
            assert isinstance(reply, Result) and not reply.success
            assert "ProtocolError" in reply.message
    finally:
        sock.close(linger=0)
    time.sleep(0.2)
    assert not marker.exists()
    assert engine.info().weight_version >= 0


def _pickle_checkpoints(root: Path, marker: Path) -> list[Path]:
    """A config.json plus a pickled 'checkpoint' under every name a loader might try."""
    dirs = []
    for file in ("pytorch_model.bin", "model.pt", "model.safetensors", "model.ckpt"):
        d = root / file.replace(".", "-")
        d.mkdir(parents=True)
        (d / file).write_bytes(payloads(marker)[-1])
        dirs.append(d)
    return dirs


def test_engine_loads_only_safetensors(cfg, tmp_path):
    marker = tmp_path / "fired"
    for d in _pickle_checkpoints(tmp_path / "ckpts", marker):
        (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        with pytest.raises(CheckpointError, match="safetensors"):
            load_model(d)
    assert not marker.exists()


def test_disk_update_from_a_pickle_checkpoint_is_refused(engines, tmp_path):
    engine = engines["e1"]
    marker = tmp_path / "fired"
    before = engine.fingerprints()
    with RpcClient(engine.endpoint, timeout_s=10) as rpc:
        for d in _pickle_checkpoints(tmp_path / "ckpts", marker):
            result = rpc.call(UpdateWeightsFromDisk(path=str(d), weight_version=1 << 30))
            assert isinstance(result, UpdateDone), result  # refused outright, not accepted
            assert not result.success and "safetensors" in result.message, result.message
            assert result.weight_version == before.weight_version and not result.live_touched
    assert not marker.exists()
    assert engine.fingerprints() == before


def test_ipc_endpoint_lives_in_an_owner_only_directory(engines):
    for engine in engines.values():
        sock_path = ipc_path(engine.endpoint)
        assert sock_path is not None and sock_path.is_socket()
        st = sock_path.parent.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert sock_path.parent.name.startswith(f"rlsync-{os.getuid()}-")
