"""The engine server: the real EngineCore in a real process over real ZMQ sockets, plus the
loop's routing and crash handling with a scripted core in a thread (exact and fast).
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq

from infer_side.process.client import EngineClient, EngineStartError, launch_engine
from infer_side.process.server import serve
from rlsync.config import EngineConfig
from rlsync.wire.codec import decode, encode
from rlsync.wire.endpoints import ipc_path, private_ipc_endpoint, remove_private_endpoint
from rlsync.wire.protocol import (
    EngineInfo,
    Generate,
    GenerateOutput,
    GetInfo,
    Message,
    Result,
    SamplingParams,
    Shutdown,
)
from rlsync.wire.rpc import EngineDead, RpcClient, RpcTimeout
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.timeout(120)
KV_TOKENS = 2048
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 1, 4, 1, 5, 9, 2, 6], [1, 2, 3, 10]]


def _frame(name: str, fields: dict) -> bytes:
    return msgpack.packb([name, fields], use_bin_type=True)


BAD_FRAMES = [
    (b"\x00\xffnot msgpack at all", "", "not valid msgpack"),
    (encode(Generate(request_id="t", input_ids=[1, 2]))[:-3], "", "not valid msgpack"),
    (_frame("Teleport", {"request_id": "r1"}), "r1", "unknown message type"),
    (_frame("Generate", {"request_id": "r2", "input_ids": "abc"}), "r2", "Generate.input_ids"),
    (
        _frame("Generate", {"request_id": "r3", "sampling": {"max_new_tokens": -1}}),
        "r3",
        "Generate.sampling.max_new_tokens",
    ),
    (_frame("GetInfo", {"request_id": "r4", "extra": 1}), "r4", "unknown field"),
    (_frame("GetInfo", {}), "", "request_id: must not be empty"),
]
"""(frame, request_id the error reply names, words in its message)"""
BAD_FRAME_IDS = [
    "random-bytes",
    "truncated",
    "unknown-type",
    "wrong-field-type",
    "negative-max-new-tokens",
    "unknown-field",
    "no-request-id",
]


def raw_call(endpoint: str, frames: list[bytes]) -> Result:
    """Send raw frames from a DEALER and decode the one reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "server did not answer a bad frame"
        reply = decode(sock.recv())
    finally:
        sock.close(linger=0)
    assert isinstance(reply, Result)
    return reply


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[EngineClient]:
    with launch_engine(checkpoint, kv_tokens=KV_TOKENS, threads=1, call_timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, GenerateOutput]:
    """What the in-process core generates for PROMPTS (greedy and seeded sampling)."""
    from infer_side.engines.native.engine_core import EngineCore

    core = EngineCore.from_checkpoint(checkpoint, EngineConfig(kv_tokens=KV_TOKENS))
    outs = []
    for req in requests():
        outs += core.process(req)
    while core.has_work():
        outs += core.step()
    return {o.request_id: o for o in outs if o.finished}


def requests() -> list[Generate]:
    greedy = SamplingParams(max_new_tokens=6)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    return [
        Generate(request_id=f"{kind}{i}", input_ids=p, sampling=sp)
        for kind, sp in (("greedy", greedy), ("sampled", sampled))
        for i, p in enumerate(PROMPTS)
    ]


def check_same_as_reference(engine: EngineClient, reference: dict[str, GenerateOutput]) -> None:
    """Same batches as the reference: all requests queue while paused, one step admits them."""
    engine.flush_cache()
    engine.pause("in_place")
    threading.Timer(0.3, engine.continue_generation).start()
    got = {o.request_id: o for o in engine.rpc.generate(requests(), timeout_s=60)}
    assert got.keys() == reference.keys()
    for rid, ref in reference.items():
        assert got[rid].output_ids == ref.output_ids, rid
        assert got[rid].logprobs == pytest.approx(ref.logprobs, abs=1e-4), rid
        assert (got[rid].finish_reason, got[rid].weight_version) == ("length", 0)


# ---------------------------------------------------------------- the real engine process


def test_server_process_generates_what_the_core_generates(engine, reference):
    check_same_as_reference(engine, reference)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert [o.output_ids for o in outs] == [reference[f"greedy{i}"].output_ids for i in range(5)]
    assert [o.cached_tokens for o in outs] == [2, 4, 0, 7, 3]  # flushed, then cached above


def test_many_prompts_at_once_come_back_as_they_finish(engine):
    lengths = [1 + 3 * i for i in range(12)][::-1]
    reqs = [
        Generate(input_ids=[i + 1, 2], sampling=SamplingParams(max_new_tokens=n))
        for i, n in enumerate(lengths)
    ]
    engine.pause("in_place")  # queue all 12, so that one step admits them together
    threading.Timer(0.5, engine.continue_generation).start()  # from another thread
    outs = list(engine.rpc.generate(reqs, timeout_s=60))
    assert [len(o.output_ids) for o in outs] == sorted(lengths)
    in_order = engine.generate([r.input_ids for r in reqs], [r.sampling for r in reqs])
    assert [len(o.output_ids) for o in in_order] == lengths


def test_stream_chunks_add_up_to_the_full_output(engine, reference):
    engine.flush_cache()
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for i, chunk in engine.generate_stream(PROMPTS[:2], SamplingParams(max_new_tokens=6)):
        tokens[i] += chunk.output_ids
        assert chunk.finished == (len(tokens[i]) == 6)
    assert tokens == {i: reference[f"greedy{i}"].output_ids for i in (0, 1)}


def test_abort_from_another_thread_ends_a_stream(engine):
    engine.pause("in_place")  # keeps the request in flight until it is aborted
    req = Generate(
        request_id="to-abort",
        input_ids=[1, 2],
        stream=True,
        sampling=SamplingParams(max_new_tokens=50),
    )

    def abort_then_continue() -> None:
        engine.abort("to-abort")
        engine.continue_generation()

    threading.Timer(0.3, abort_then_continue).start()
    outs = list(engine.rpc.generate([req], timeout_s=30))
    assert [(o.finished, o.finish_reason, o.output_ids) for o in outs] == [(True, "abort", [])]


def test_endpoint_dir_is_private(engine):
    directory = ipc_path(engine.endpoint).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert ipc_path(engine.endpoint).is_socket()


@pytest.mark.parametrize("frame, rid, words", BAD_FRAMES, ids=BAD_FRAME_IDS)
def test_server_process_survives_bad_frames(engine, reference, frame, rid, words):
    reply = raw_call(engine.endpoint, [frame])
    assert not reply.success and reply.request_id == rid and words in reply.message
    assert engine.process.poll() is None
    check_same_as_reference(engine, reference)


def test_killed_engine_fails_a_pending_call_fast(checkpoint):
    engine = launch_engine(checkpoint, kv_tokens=KV_TOKENS, threads=1)
    directory = ipc_path(engine.endpoint).parent
    engine.pause("in_place")  # the Generate below waits until the engine dies
    threading.Timer(0.5, os.kill, (engine.process.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(EngineDead, match="liveness"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4), timeout_s=60)
    assert time.monotonic() - start < 2.0
    engine.close()
    assert engine.process.returncode == -signal.SIGKILL and not directory.exists()


def test_shutdown_stops_the_process_cleanly(checkpoint):
    engine = launch_engine(checkpoint, kv_tokens=KV_TOKENS, threads=1)
    sock = ipc_path(engine.endpoint)
    assert engine.shutdown(timeout_s=30).success
    assert engine.process.returncode == 0 and not sock.exists()
    engine.close()
    assert not sock.parent.exists()


def test_close_kills_an_engine_that_does_not_answer(checkpoint):
    engine = launch_engine(checkpoint, kv_tokens=KV_TOKENS, threads=1)
    directory = ipc_path(engine.endpoint).parent
    os.kill(engine.process.pid, signal.SIGSTOP)  # hung: no Shutdown reply, SIGTERM stays pending
    start = time.monotonic()
    engine.close(grace_s=0.5)
    assert engine.process.returncode == -signal.SIGKILL and not directory.exists()
    assert time.monotonic() - start < 10


def test_engine_that_cannot_start_reports_its_stderr(tmp_path):
    """A missing model is a bad option (exit 2, one `error:` line naming it), not a crash."""
    missing = tmp_path / "missing"
    with pytest.raises(EngineStartError) as err:
        launch_engine(missing, start_timeout_s=60)
    assert str(err.value) == (
        "engine exited with code 2 before it was ready; stderr tail:\n"
        f"error: --model {missing}: no such directory\n"
    )


# ---------------------------------------------------------------- the loop, with a scripted core


class ScriptedCore:
    """Generates input_ids[0] + step index, one token per step; crashes on a prompt [666]."""

    def __init__(self) -> None:
        self.shutdown_requested = False
        self.running: dict[str, tuple[Generate, list[int]]] = {}

    def process(self, msg: Message) -> list[Message]:
        if isinstance(msg, Generate):
            self.running[msg.request_id] = (msg, [])
            return []
        if isinstance(msg, Shutdown):
            self.shutdown_requested = True
        if isinstance(msg, GetInfo):
            return [EngineInfo(request_id=msg.request_id, model={"bad": object()})]
        return [Result(request_id=msg.request_id, message=type(msg).__name__)]

    def step(self) -> list[Message]:
        time.sleep(0.001)  # a step takes time, so requests overlap
        outs = []
        for rid, (req, done) in list(self.running.items()):
            if req.input_ids == [666]:
                raise RuntimeError("scripted crash")
            done.append(req.input_ids[0] + len(done))
            finished = len(done) == req.sampling.max_new_tokens
            if finished:
                del self.running[rid]
            if req.stream or finished:
                ids = done[-1:] if req.stream else done
                outs.append(
                    GenerateOutput(
                        request_id=rid,
                        output_ids=ids,
                        finished=finished,
                        finish_reason="length" if finished else None,
                    )
                )
        return outs

    def idle_wait_ms(self) -> int:
        return 50

    def has_work(self) -> bool:
        return bool(self.running)

    def close(self) -> None:
        pass


@dataclass
class Running:
    endpoint: str
    thread: threading.Thread
    error: list[BaseException]


@pytest.fixture
def server() -> Iterator[Running]:
    endpoint = private_ipc_endpoint("fake")
    ready = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        try:
            serve(ScriptedCore(), endpoint, lambda ep: ready.set())
        except BaseException as exc:  # the test inspects what the loop raised
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield Running(endpoint, thread, error)
    if thread.is_alive():
        try:
            with RpcClient(endpoint, timeout_s=5) as rpc:
                rpc.call(Shutdown())
        except RpcTimeout:
            pass  # the test already shut it down; it is closing its socket (linger)
    thread.join(5)
    remove_private_endpoint(endpoint)


def gen(first: int, n: int = 3, stream: bool = False) -> Generate:
    return Generate(input_ids=[first], sampling=SamplingParams(max_new_tokens=n), stream=stream)


def test_outputs_go_to_the_client_that_asked(server):
    with (
        RpcClient(server.endpoint, timeout_s=10) as a,
        RpcClient(server.endpoint, timeout_s=10) as b,
    ):
        outs_a = a.generate([gen(10, 4), gen(20, 2)])
        outs_b = b.generate([gen(30, 3, stream=True)])
        got_b = [o.output_ids for o in outs_b]
        got_a = [o.output_ids for o in outs_a]
    assert got_a == [[20, 21], [10, 11, 12, 13]]  # the shorter one finishes first
    assert got_b == [[30], [31], [32]]


def test_shutdown_stops_the_loop(server):
    with RpcClient(server.endpoint, timeout_s=10) as rpc:
        assert rpc.call(Shutdown()).success
    server.thread.join(5)
    assert not server.thread.is_alive() and server.error == []


def test_shutdown_fails_requests_still_in_flight(server):
    with (
        RpcClient(server.endpoint, timeout_s=10) as a,
        RpcClient(server.endpoint, timeout_s=10) as b,
    ):
        a.send(gen(1, 10_000))
        assert b.call(Shutdown()).success
        with pytest.raises(EngineDead, match="engine shut down before this request finished"):
            a.recv()  # raised only for an EngineDied addressed to this request


def test_core_crash_fails_pending_requests_fast(server):
    with RpcClient(server.endpoint, timeout_s=30) as rpc:
        start = time.monotonic()
        with pytest.raises(EngineDead, match="RuntimeError: scripted crash"):
            list(rpc.generate([gen(1, 100), gen(666)]))
        assert time.monotonic() - start < 2
    server.thread.join(5)
    assert isinstance(server.error[0], RuntimeError)


def test_unencodable_reply_becomes_an_error_result(server):
    with RpcClient(server.endpoint, timeout_s=10) as rpc:
        result = rpc.call(GetInfo())
        assert isinstance(result, Result)
        assert not result.success and "reply EngineInfo not encodable" in result.message
        assert [o.output_ids for o in rpc.generate([gen(5, 2)])] == [[5, 6]]


@pytest.mark.parametrize("frame, rid, words", BAD_FRAMES, ids=BAD_FRAME_IDS)
def test_bad_frames_get_an_error_reply_and_the_loop_goes_on(server, frame, rid, words):
    reply = raw_call(server.endpoint, [frame])
    assert not reply.success and reply.request_id == rid and words in reply.message
    with RpcClient(server.endpoint, timeout_s=10) as rpc:
        assert [o.output_ids for o in rpc.generate([gen(7, 2)])] == [[7, 8]]


def test_multipart_and_duplicate_ids_are_rejected(server):
    reply = raw_call(server.endpoint, [b"a", b"b"])
    assert not reply.success and "one frame" in reply.message
    with RpcClient(server.endpoint, timeout_s=10) as rpc:
        sampling = SamplingParams(max_new_tokens=300)
        first = rpc.send(Generate(request_id="dup", input_ids=[1], sampling=sampling, stream=True))
        chunks = [rpc.recv()]  # the server holds "dup" now (send() only queues the frame)
        reply = raw_call(server.endpoint, [encode(first)])
        assert not reply.success and "already in flight" in reply.message
        while not chunks[-1].finished:
            chunks.append(rpc.recv())
        assert [t for c in chunks for t in c.output_ids] == list(range(1, 301))
