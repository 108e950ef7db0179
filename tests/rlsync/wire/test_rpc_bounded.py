"""RpcClient bookkeeping stays bounded against a flaky engine (issue 19, cause 8).

The engine is a scripted ROUTER peer in a thread (a stand-in for the other side): per request
it answers at once, drops it, answers only the interim UpdateAccepted, or answers late (with
the next request's reply, after the client gave up). The client does what the pusher does:
`send`, `recv` until its own reply or the timeout, and `forget` a request it gave up on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from rlsync.wire.endpoints import private_ipc_endpoint, remove_private_endpoint
from rlsync.wire.protocol import (
    Generate,
    GetInfo,
    Message,
    UpdateAccepted,
    UpdateDone,
    UpdateWeightsFromDisk,
)
from rlsync.wire.rpc import RpcClient, RpcTimeout
from tests.rlsync.wire.test_rpc import Peer

pytestmark = pytest.mark.timeout(240)

ROUNDS = 2000
GIVE_UP_S = 0.005
ANSWER_S = 10.0


class FlakyEngine:
    """Round i: i % 4 == 0 answered, 1 dropped, 2 accepted but never done, 3 answered late."""

    def __init__(self) -> None:
        self.held: list[Message] = []
        self.count = 0

    def __call__(self, seen: list[Message]) -> list[Message]:
        msg, i = seen[-1], self.count
        seen.clear()  # the peer keeps no history: only the client's memory is measured
        if not isinstance(msg, UpdateWeightsFromDisk):
            return []  # calls and generations in this test are never answered
        late, self.held = self.held, []
        self.count += 1
        done = UpdateDone(request_id=msg.request_id, weight_version=msg.weight_version)
        kind = i % 4
        if kind == 0:
            return [*late, done]
        if kind == 2:
            return [*late, UpdateAccepted(request_id=msg.request_id)]
        if kind == 3:
            self.held = [done]
        return late


@pytest.fixture
def endpoint() -> Iterator[str]:
    ep = private_ipc_endpoint("rpc-bounded")
    yield ep
    remove_private_endpoint(ep)


def push_once(client: RpcClient, version: int) -> bool:
    """One update as the pusher does it: True when its UpdateDone came back in time."""
    rid = client.send(UpdateWeightsFromDisk(path="/x", weight_version=version)).request_id
    wait_s = ANSWER_S if version % 4 == 0 else GIVE_UP_S  # only round 0 of 4 is answered
    try:
        while True:
            reply = client.recv(wait_s)
            if reply.request_id == rid and isinstance(reply, UpdateDone):
                assert reply.weight_version == version  # never a stale reply for an old push
                return True
    except RpcTimeout:
        client.forget(rid)
        return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_forget_drops_a_given_up_request_and_its_late_reply(endpoint):
    peer = Peer(endpoint, FlakyEngine())
    try:
        with RpcClient(endpoint, timeout_s=5) as client:
            answered = [push_once(client, v) for v in range(8)]
            assert answered == [True, False, False, False] * 2
            assert client.pending() == 0
            assert len(client._loose_box) == 0
    finally:
        peer.close()


def test_a_long_run_against_a_flaky_engine_keeps_bookkeeping_fds_and_rss_flat(endpoint):
    peer = Peer(endpoint, FlakyEngine())
    try:
        with RpcClient(endpoint, timeout_s=5) as client:
            for v in range(100):  # warm up: sockets, pools, allocator arenas
                push_once(client, v)
            fds, rss = open_fds(), rss_bytes()
            answered = 0
            for v in range(100, 100 + ROUNDS):
                answered += push_once(client, v)
                assert client.pending() == 0, f"round {v}: {client.pending()} entries kept"
                assert len(client._loose_box) == 0
            given_up = abandon_calls_and_generations(client)
            assert client.pending() == 0
            assert open_fds() == fds
            grown = rss_bytes() - rss
            assert grown < 4 << 20, f"RSS grew {grown >> 10} KiB"
    finally:
        peer.close()
    assert answered == ROUNDS // 4
    assert given_up == 40


def abandon_calls_and_generations(client: RpcClient) -> int:
    """Calls and generations the engine never answers: each times out, each is forgotten."""
    given_up = 0
    for _ in range(20):
        with pytest.raises(RpcTimeout):
            client.call(GetInfo(), timeout_s=GIVE_UP_S)
        given_up += 1
        with pytest.raises(RpcTimeout):
            list(client.generate([Generate(input_ids=[1, 2])], timeout_s=GIVE_UP_S))
        given_up += 1
        assert client.pending() == 0
    return given_up


def test_a_request_that_could_not_be_sent_leaves_no_entry(endpoint):
    with RpcClient(endpoint, timeout_s=5) as client:  # nobody bound: sends cannot go out
        for _ in range(3):
            with pytest.raises(RpcTimeout):
                client.call(GetInfo(), timeout_s=GIVE_UP_S)
        assert client.pending() == 0
