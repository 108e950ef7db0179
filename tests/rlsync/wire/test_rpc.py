"""RpcClient and endpoints against real ZMQ sockets: a scripted ROUTER peer in a thread.

The peer is a stand-in for an engine, so these tests know nothing about infer_side.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from rlsync.wire.codec import ProtocolError, decode, encode
from rlsync.wire.endpoints import (
    MAX_IPC_PATH,
    EndpointError,
    check_endpoint,
    ipc_path,
    private_ipc_endpoint,
    remove_private_endpoint,
)
from rlsync.wire.protocol import (
    EngineDied,
    EngineInfo,
    Generate,
    GenerateOutput,
    GetInfo,
    GetWeightsFingerprint,
    Message,
    Result,
    UpdateAccepted,
    UpdateDone,
    UpdateWeightsFromDisk,
    WeightFingerprints,
)
from rlsync.wire.rpc import EngineDead, RpcClient, RpcError, RpcTimeout

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[list[Message]], list[Message]]
"""A scripted peer: given every request received so far, the replies to send now."""


class Peer:
    """A ROUTER socket in a thread that answers with `handler`; a silent peer when None."""

    def __init__(self, endpoint: str, handler: Handler | None):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(endpoint)
        self.handler, self.seen = handler, []
        self.identity: bytes | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(10):
                continue
            identity, frame = self.sock.recv_multipart()
            self.identity = identity
            self.seen.append(decode(frame))
            for reply in self.handler(self.seen) if self.handler else []:
                self.sock.send_multipart(
                    [identity, reply if isinstance(reply, bytes) else encode(reply)]
                )

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close(linger=0)


@pytest.fixture
def endpoint() -> Iterator[str]:
    ep = private_ipc_endpoint("rpc-test")
    yield ep
    remove_private_endpoint(ep)


@pytest.fixture
def peer_factory(endpoint: str) -> Iterator[Callable[[Handler | None], Peer]]:
    peers: list[Peer] = []

    def make(handler: Handler | None) -> Peer:
        peers.append(Peer(endpoint, handler))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def echo_names(seen: list[Message]) -> list[Message]:
    """Answer each GetWeightsFingerprint with its own names as the fingerprinted tensors."""
    msg = seen[-1]
    return [
        WeightFingerprints(
            request_id=msg.request_id, fingerprints={n: i for i, n in enumerate(msg.names)}
        )
    ]


def names(reply: Message) -> list[str]:
    assert isinstance(reply, WeightFingerprints), reply
    return list(reply.fingerprints)


# ---------------------------------------------------------------- endpoints


def test_private_endpoint_is_in_a_0700_dir_and_cleaned_up():
    ep = private_ipc_endpoint("engine")
    directory = ipc_path(ep).parent
    st = directory.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert len(os.fsencode(ipc_path(ep))) <= MAX_IPC_PATH
    assert check_endpoint(ep) == ep
    remove_private_endpoint(ep)
    assert not directory.exists()


def test_private_endpoint_falls_back_when_base_path_is_too_long(tmp_path: Path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with pytest.raises(EndpointError, match="107"):
        private_ipc_endpoint("engine", base_dir=deep)
    assert list(deep.iterdir()) == []


def test_remove_leaves_foreign_dirs_alone(tmp_path: Path):
    (tmp_path / "x.sock").write_text("")
    remove_private_endpoint(f"ipc://{tmp_path}/x.sock")
    assert (tmp_path / "x.sock").exists()


@pytest.mark.parametrize(
    "bad, words",
    [
        ("", "empty"),
        ("http://x:1", "expected ipc"),
        ("ipc://relative.sock", "absolute"),
        ("ipc:///" + "a" * 120, "unix socket limit"),
        ("ipc:///no/such/dir/x.sock", "does not exist"),
        ("tcp://127.0.0.1", "tcp://host:port"),
        ("tcp://127.0.0.1:0", "not in 1..65535"),
        ("tcp://127.0.0.1:70000", "not in 1..65535"),
    ],
)
def test_check_endpoint_rejects_with_reason(bad: str, words: str):
    with pytest.raises(EndpointError, match=words):
        check_endpoint(bad)


@pytest.mark.parametrize(
    "good", ["tcp://127.0.0.1:5555", "tcp://*:*", "tcp://[::1]:80", "tcp://engine-0.local:9000"]
)
def test_check_endpoint_accepts_tcp(good: str):
    assert check_endpoint(good) == good


# ---------------------------------------------------------------- timeouts and liveness


def test_call_times_out_against_a_silent_peer(endpoint, peer_factory):
    peer_factory(None)
    with RpcClient(endpoint, timeout_s=0.3) as rpc:
        start = time.monotonic()
        with pytest.raises(RpcTimeout) as err:
            rpc.call(GetInfo())
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 1.5
    assert endpoint in str(err.value) and "GetInfo" in str(err.value) and "0.3 s" in str(err.value)


def test_call_times_out_when_nobody_listens(endpoint):
    with RpcClient(endpoint, timeout_s=0.2) as rpc:
        with pytest.raises(RpcTimeout):
            rpc.call(GetInfo())
        with pytest.raises(RpcTimeout):
            next(rpc.generate([Generate(input_ids=[1])]))
        rpc.send(GetInfo())
        with pytest.raises(RpcTimeout, match="GetInfo"):
            rpc.recv(timeout_s=0.2)


def test_engine_dead_is_raised_promptly_when_liveness_fails(endpoint, peer_factory):
    peer_factory(None)
    died_at = time.monotonic() + 0.3
    with RpcClient(endpoint, timeout_s=30.0, liveness=lambda: time.monotonic() < died_at) as rpc:
        with pytest.raises(EngineDead, match="liveness"):
            rpc.call(GetInfo())
        assert time.monotonic() - died_at < 0.25


def test_reply_already_sent_by_a_dead_peer_is_still_delivered(endpoint, peer_factory):
    peer_factory(echo_names)
    with RpcClient(endpoint, timeout_s=5.0, liveness=lambda: False) as rpc:
        assert rpc.call(GetWeightsFingerprint(names=["w"])).fingerprints == {"w": 0}


def test_engine_died_reply_raises(endpoint, peer_factory):
    peer_factory(
        lambda seen: [
            EngineDied(request_id=seen[-1].request_id, message="engine crashed: RuntimeError: boom")
        ]
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        with pytest.raises(EngineDead, match="engine crashed: RuntimeError: boom"):
            rpc.call(GetInfo())
        with pytest.raises(EngineDead, match="boom"):
            rpc.call_ok(GetInfo())
        with pytest.raises(EngineDead, match="boom"):
            list(rpc.generate([Generate(input_ids=[1])]))
        rpc.send(GetInfo())
        with pytest.raises(EngineDead, match="boom"):
            rpc.recv()


def test_a_failed_result_is_not_read_as_engine_death(endpoint, peer_factory):
    # The old protocol signalled death by a message prefix; a failure text that happens to
    # start like it is only a failure now.
    peer_factory(
        lambda seen: [
            Result(request_id=seen[-1].request_id, success=False, message="engine dead: not really")
        ]
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        with pytest.raises(RpcError, match="engine dead: not really"):
            rpc.call_ok(GetInfo())


# ---------------------------------------------------------------- pairing replies with calls


def test_failed_result_is_returned_and_call_ok_raises(endpoint, peer_factory):
    peer_factory(
        lambda seen: [
            Result(request_id=seen[-1].request_id, success=False, message="not idle: 2 running")
        ]
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        assert rpc.call(GetInfo()).message == "not idle: 2 running"
        with pytest.raises(RpcError, match="GetInfo failed: not idle: 2 running") as err:
            rpc.call_ok(GetInfo())
    assert isinstance(err.value.reply, Result)
    assert (err.value.reply.success, err.value.reply.message) == (False, "not idle: 2 running")


def test_call_returns_the_typed_reply(endpoint, peer_factory):
    def typed(seen):
        msg = seen[-1]
        if isinstance(msg, GetInfo):
            return [
                EngineInfo(
                    request_id=msg.request_id,
                    weight_version=4,
                    kv_pool_size=64,
                    kv_pool_used=8,
                    admission_held=True,
                )
            ]
        return [
            UpdateAccepted(request_id=msg.request_id, weight_version=5, bytes=96),
            UpdateDone(
                request_id=msg.request_id,
                success=False,
                message="bad bytes",
                weight_version=4,
                bytes=96,
                transport="disk",
            ),
        ]

    peer_factory(typed)
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        info = rpc.call_ok(GetInfo())
        assert isinstance(info, EngineInfo)
        assert (info.weight_version, info.kv_pool_size, info.kv_pool_used, info.admission_held) == (
            4,
            64,
            8,
            True,
        )
        sent = rpc.send(UpdateWeightsFromDisk(path="/x", weight_version=5))
        accepted, done = rpc.recv(), rpc.recv()
        with pytest.raises(RuntimeError, match="nothing was sent"):
            rpc.recv()  # UpdateDone was the update's final reply
    assert isinstance(accepted, UpdateAccepted) and accepted.request_id == sent.request_id
    assert (accepted.weight_version, accepted.bytes) == (5, 96)
    assert isinstance(done, UpdateDone) and done.request_id == sent.request_id
    assert (done.success, done.message, done.weight_version, done.transport) == (
        False,
        "bad bytes",
        4,
        "disk",
    )


def test_call_ok_raises_on_a_failed_update_done(endpoint, peer_factory):
    peer_factory(
        lambda seen: [
            UpdateDone(
                request_id=seen[-1].request_id,
                success=False,
                message="version 3 is not newer than 4",
                weight_version=4,
            )
        ]
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        with pytest.raises(
            RpcError, match="UpdateWeightsFromDisk failed: version 3 is not newer"
        ) as err:
            rpc.call_ok(UpdateWeightsFromDisk(path="/x", weight_version=3))
    assert isinstance(err.value.reply, UpdateDone) and err.value.reply.weight_version == 4


def test_a_generate_output_for_a_control_call_is_a_protocol_error(endpoint, peer_factory):
    peer_factory(lambda seen: [GenerateOutput(request_id=seen[-1].request_id, output_ids=[1])])
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        with pytest.raises(ProtocolError, match="not a reply to GetInfo"):
            rpc.call(GetInfo())


def test_unknown_request_ids_are_dropped(endpoint, peer_factory):
    def stray_first(seen):
        return [Result(request_id="nobody", message="stray"), b"\x93garbage", *echo_names(seen)]

    peer_factory(stray_first)
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        assert names(rpc.call(GetWeightsFingerprint(names=["a"]))) == ["a"]


def test_concurrent_calls_from_threads_get_their_own_replies(endpoint, peer_factory):
    def reverse_in_fours(seen):  # hold replies until 4 calls arrived, answer newest first
        if len(seen) % 4:
            return []
        return [echo_names([m])[0] for m in reversed(seen[-4:])]

    peer_factory(reverse_in_fours)
    results: dict[int, list[str]] = {}
    with RpcClient(endpoint, timeout_s=10.0) as rpc:

        def worker(i: int) -> None:
            results[i] = names(rpc.call(GetWeightsFingerprint(names=[f"w{i}"])))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: [f"w{i}"] for i in range(8)}


def test_pipelined_send_then_recv(endpoint, peer_factory):
    peer_factory(
        lambda seen: [echo_names([m])[0] for m in reversed(seen)] if len(seen) == 3 else []
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        sent = [rpc.send(GetWeightsFingerprint(names=[str(i)])) for i in range(3)]
        got = [rpc.recv() for _ in range(3)]
        with pytest.raises(RuntimeError, match="nothing was sent"):
            rpc.recv()
    assert [r.request_id for r in got] == [m.request_id for m in reversed(sent)]
    assert [names(r) for r in got] == [["2"], ["1"], ["0"]]


def test_recv_with_zero_timeout_returns_replies_already_here(endpoint, peer_factory):
    peer = peer_factory(echo_names)
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        sent = rpc.send(GetWeightsFingerprint(names=["x"]))
        while not peer.seen:
            time.sleep(0.01)
        time.sleep(0.1)
        assert rpc.recv(timeout_s=0).request_id == sent.request_id


def test_generate_yields_outputs_as_they_finish(endpoint, peer_factory):
    def finish_in_reverse(seen):  # stream a chunk for each, then finish newest first
        if len(seen) < 3:
            return []
        gens = [m for m in seen if isinstance(m, Generate)][:3]
        chunks = [
            GenerateOutput(request_id=g.request_id, output_ids=[9], finished=False) for g in gens
        ]
        done = [
            GenerateOutput(request_id=g.request_id, output_ids=g.input_ids, finish_reason="length")
            for g in reversed(gens)
        ]
        return chunks + done if len(seen) == 3 else []

    peer_factory(finish_in_reverse)
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        reqs = [Generate(request_id=f"g{i}", input_ids=[i], stream=True) for i in range(3)]
        outs = list(rpc.generate(reqs))
    assert [(o.request_id, o.finished) for o in outs[:3]] == [
        ("g0", False),
        ("g1", False),
        ("g2", False),
    ]
    assert [(o.request_id, o.output_ids) for o in outs[3:]] == [
        ("g2", [2]),
        ("g1", [1]),
        ("g0", [0]),
    ]


def test_generate_rejection_becomes_an_error_output(endpoint, peer_factory):
    peer_factory(
        lambda seen: [
            Result(request_id=seen[-1].request_id, success=False, message="prompt too long")
        ]
    )
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        (out,) = rpc.generate([Generate(input_ids=[1])])
    assert out.finished and out.error == "prompt too long" and out.finish_reason == "abort"


def test_generate_timeout_aborts_unfinished_requests(endpoint, peer_factory):
    peer = peer_factory(lambda seen: [])
    with RpcClient(endpoint, timeout_s=5.0) as rpc:
        with pytest.raises(RpcTimeout, match="Generate x1"):
            list(rpc.generate([Generate(request_id="slow", input_ids=[1])], timeout_s=0.2))
        deadline = time.monotonic() + 2
        while len(peer.seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [type(m).__name__ for m in peer.seen] == ["Generate", "Abort"]
    assert peer.seen[1].target_id == "slow"


def test_generate_timeout_holds_while_chunks_keep_coming(endpoint):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    stop = threading.Event()

    def stream_forever() -> None:
        assert sock.poll(5000)
        identity, frame = sock.recv_multipart()
        chunk = encode(
            GenerateOutput(request_id=decode(frame).request_id, output_ids=[1], finished=False)
        )
        while not stop.wait(0.002):
            sock.send_multipart([identity, chunk])

    thread = threading.Thread(target=stream_forever, daemon=True)
    thread.start()
    try:
        with RpcClient(endpoint, timeout_s=5.0) as rpc:
            start = time.monotonic()
            with pytest.raises(RpcTimeout):
                for _ in rpc.generate([Generate(input_ids=[1], stream=True)], timeout_s=0.3):
                    pass
            assert time.monotonic() - start < 1.0
    finally:
        stop.set()
        thread.join()
        sock.close(linger=0)


def test_closed_client_refuses_calls(endpoint):
    rpc = RpcClient(endpoint, timeout_s=1.0)
    rpc.close()
    rpc.close()
    with pytest.raises(RuntimeError, match="closed"):
        rpc.call(GetInfo())
