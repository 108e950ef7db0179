"""`rlsync.wire.netutil`: a free port can be bound; this node's address is one of ours."""

from __future__ import annotations

import ipaddress
import socket
import sys
import types

import pytest

from rlsync.wire import netutil


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_free_port_can_be_bound_and_listened_on(host: str) -> None:
    port = netutil.free_port(host)
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind((host, port))
        sock.listen()
        assert sock.getsockname()[1] == port


def test_a_free_ipv6_port_can_be_bound() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = netutil.free_port("[::1]")
    except OSError:
        pytest.skip("::1 not configured")
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", port))


def test_node_address_is_an_address_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    address = netutil.node_address()
    ipaddress.ip_address(address)
    with socket.socket() as sock:  # only a local address can be bound
        sock.bind((address, 0))


def test_node_address_is_rays_when_running_under_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        is_initialized=lambda: True,
        util=types.SimpleNamespace(get_node_ip_address=lambda: "10.1.2.3"),
    )
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert netutil.node_address() == "10.1.2.3"
    monkeypatch.setattr(fake, "is_initialized", lambda: False)
    assert netutil.node_address() != "10.1.2.3"
