"""Addresses and ports of this machine: a free TCP port, this node's address.

One place for both, so the trainer, the engines, the CLI and the tests pick ports and
addresses the same way. Nothing here depends on Ray: `node_address` asks Ray only if this
process already runs under it.
"""

from __future__ import annotations

import socket
import sys

ROUTE_PROBE = ("8.8.8.8", 53)
"""Any routable address: `node_address` asks the kernel for the route there (no packet is
sent), and the route's source address is the one other nodes can reach."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (bind to port 0, read it, close).

    Another process may take it before the caller binds it; use it at once, and prefer
    binding port 0 yourself where the API allows (`tcp://host:*` endpoints do).
    """
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_address() -> str:
    """This node's IP address as other nodes reach it.

    Under Ray (`ray` imported and initialised in this process) it is the address Ray
    advertises for this node, which is what peers found through Ray will use; it can differ
    from the default route's on a multi-homed node (`ray start --node-ip-address`).
    Otherwise it is the source address of this machine's route to the outside, and
    127.0.0.1 when there is none (a machine without a network).
    """
    ray = sys.modules.get("ray")  # never imported here: rlsync does not depend on Ray
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(ROUTE_PROBE)  # UDP connect: picks the route, sends nothing
        except OSError:
            return "127.0.0.1"
        return sock.getsockname()[0]
