"""tcp:// engines require CURVE authentication: authorized clients generate and push;
clients without a key, with a key not on the allow-list, or not knowing the engine's key
cannot generate, flush or push (they time out, the engine's state does not move) and the
engine logs every attempt; `rlsync serve` refuses tcp:// without keys unless --insecure-tcp.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from infer_side.process.client import EngineStartError, connect, launch_engine
from infer_side.process.server import run_engine
from rlsync.config import SyncConfig
from rlsync.transports.disk import write_weights
from rlsync.wire.auth import (
    AuthError,
    ClientKeys,
    generate_keys,
    load_client_keys,
    load_server_keys,
)
from rlsync.wire.netutil import free_port
from rlsync.wire.protocol import (
    FlushCache,
    Generate,
    GetInfo,
    UpdateAccepted,
    UpdateDone,
    UpdateWeightsFromDisk,
    is_final,
)
from rlsync.wire.rpc import RpcClient, RpcTimeout
from tests.e2e.sync_helpers import PROMPTS, greedy, trainer_weights
from trainer_side.sync.push_report import PushError
from trainer_side.sync.pusher import WeightPusher

ROOT = Path(__file__).resolve().parents[2]
LOGGED = {
    "no key": "CURVE handshake failed",
    "unknown client key": "is not allowed",
    "wrong engine key": "CURVE handshake failed",
}
"""What the engine's log says about each kind of intruder (at least every 2 s it retries)."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return generate_keys(tmp_path_factory.mktemp("auth") / "keys")


@pytest.fixture(scope="module")
def tcp_engine(ckpt, keys):
    engine = launch_engine(
        ckpt, endpoint="tcp://127.0.0.1:*", auth_keys=keys, kv_tokens=256, threads=1
    )
    yield engine
    engine.close()


def _update(rpc: RpcClient, msg: UpdateWeightsFromDisk, timeout_s: float = 30.0) -> list:
    """Send a weight update and collect its replies up to the final one."""
    rpc.send(msg)
    replies = [rpc.recv(timeout_s)]
    while not is_final(replies[-1]):
        replies.append(rpc.recv(timeout_s))
    return replies


def _intruders(keys: Path) -> dict[str, ClientKeys | None]:
    legit = load_client_keys(keys)
    stranger_pub, stranger_sec = zmq.curve_keypair()
    fake_server, _ = zmq.curve_keypair()
    return {
        "no key": None,
        "unknown client key": ClientKeys(stranger_pub, stranger_sec, legit.server_public),
        "wrong engine key": ClientKeys(legit.public, legit.secret, fake_server),
    }


def test_authorized_client_generates_and_pushes(tcp_engine, keys, ckpt, cfg, tmp_path):
    client = connect(tcp_engine.endpoint, auth_keys=keys, timeout_s=30)
    try:
        assert all(o.error == "" for o in client.generate(PROMPTS, greedy()))
        version = client.info().weight_version + 1
        write_weights(tmp_path / "w", trainer_weights(ckpt, version), version, cfg=cfg)
        replies = _update(
            client.rpc, UpdateWeightsFromDisk(path=str(tmp_path / "w"), weight_version=version)
        )
        assert [type(r) for r in replies] == [UpdateAccepted, UpdateDone]
        accepted, done = replies
        assert accepted.weight_version == version and accepted.bytes > 0
        assert done.success, done.message
        assert (done.weight_version, done.transport, done.weights_incomplete) == (
            version,
            "disk",
            False,
        )
        assert client.info().weight_version == version
    finally:
        client.close()


@pytest.mark.parametrize("who", ["no key", "unknown client key", "wrong engine key"])
def test_unauthenticated_client_cannot_generate_flush_or_push(
    tcp_engine, keys, ckpt, cfg, tmp_path, who
):
    tcp_engine.generate(PROMPTS, greedy())  # something in the prefix cache a flush would drop
    before, info = tcp_engine.fingerprints(), tcp_engine.info()
    assert info.prefix_cache_tokens > 0
    version = info.weight_version + 1
    write_weights(tmp_path / "w", trainer_weights(ckpt, version), version, cfg=cfg)
    log_start = len(tcp_engine.stderr_tail(1 << 30))
    with RpcClient(tcp_engine.endpoint, timeout_s=1.0, auth=_intruders(keys)[who]) as rpc:
        for msg in (
            GetInfo(),
            FlushCache(),
            UpdateWeightsFromDisk(path=str(tmp_path / "w"), weight_version=version),
        ):
            with pytest.raises(RpcTimeout):
                rpc.call(msg)
        with pytest.raises(RpcTimeout):
            list(rpc.generate([Generate(input_ids=[1, 2, 3])]))
    assert tcp_engine.fingerprints() == before
    assert tcp_engine.info() == info  # same version, same cache, nothing queued
    new_log = tcp_engine.stderr_tail(1 << 30)[log_start:]  # what this intruder caused
    assert "auth: rejected" in new_log and LOGGED[who] in new_log, new_log[-2000:]


def test_pusher_without_keys_cannot_push(tcp_engine, tmp_path):
    before = tcp_engine.fingerprints()
    cfg = SyncConfig(transport="disk", timeout_s=1.0)
    with pytest.raises(PushError, match="did not answer"):
        WeightPusher(cfg, {"tcp": tcp_engine.endpoint}, tmp_path, connect_timeout_s=1.0)
    assert tcp_engine.fingerprints() == before


def test_serve_refuses_tcp_without_keys(ckpt):
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlsync.cli",
            "serve",
            "--model",
            str(ckpt),
            "--endpoint",
            f"tcp://127.0.0.1:{port}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "require authentication" in proc.stderr and "--auth-keys" in proc.stderr
    with socket.socket() as s:  # nothing was bound
        s.bind(("127.0.0.1", port))


def test_launch_engine_on_tcp_without_keys_refuses_to_start(ckpt):
    with pytest.raises(EngineStartError, match="require authentication"):
        launch_engine(ckpt, endpoint="tcp://127.0.0.1:*", start_timeout_s=60)


def _args(**kw) -> argparse.Namespace:
    """The engine's own options (every default from its parser), with `kw` set."""
    from infer_side.process.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            "/nonexistent-model",
            "--endpoint",
            "tcp://127.0.0.1:9",
            "--kv-tokens",
            "64",
            "--max-running",
            "4",
        ]
    )
    return argparse.Namespace(**{**vars(args), **kw})


def test_insecure_tcp_flag_lifts_the_refusal(capsys):
    assert run_engine(_args(insecure_tcp=True)) == 2  # gets past auth, refused on the model
    err = capsys.readouterr().err
    assert "authentication" not in err
    assert err == "error: --model /nonexistent-model: no such directory\n"


@pytest.mark.parametrize("problem", ["missing dir", "secret readable by others", "no clients"])
def test_bad_key_material_is_refused_clearly(tmp_path, capsys, problem):
    keys = generate_keys(tmp_path / "keys")
    target = {
        "missing dir": tmp_path / "nope",
        "secret readable by others": keys,
        "no clients": keys,
    }[problem]
    if problem == "secret readable by others":
        os.chmod(keys / "server.key_secret", 0o644)
    if problem == "no clients":
        for f in (keys / "authorized_clients").iterdir():
            f.unlink()
    with pytest.raises(AuthError):
        load_server_keys(target)
    assert run_engine(_args(auth_keys=str(target))) == 2
    assert "error:" in capsys.readouterr().err


def test_bad_options_leave_no_private_endpoint_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the private dir would go
    assert run_engine(_args(endpoint=None, kv_tokens=0)) == 2
    assert "kv_tokens" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_key_directory_is_private(keys):
    assert os.stat(keys).st_mode & 0o777 == 0o700
    for secret in keys.glob("*.key_secret"):
        assert os.stat(secret).st_mode & 0o777 == 0o600
    assert load_server_keys(keys).allowed == {z85.decode(load_client_keys(keys).public)}
