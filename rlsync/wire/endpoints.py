"""ZMQ endpoints: private ipc:// sockets by default, tcp:// only when configured.

An engine's control socket accepts weight updates, so by default it lives in a fresh
directory that only this user can enter (mode 0700): nobody else on the machine can connect.
`check_endpoint` validates endpoints given by a user with errors that say what is wrong.
Nothing here opens a socket.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

MAX_IPC_PATH = 107
"""sun_path holds 108 bytes including the terminating NUL."""
_PREFIX = "rlsync-"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>\d+|\*)$")


class EndpointError(ValueError):
    """An endpoint string that cannot be used; the message says why."""


def private_ipc_endpoint(name: str | None = None, base_dir: str | os.PathLike | None = None) -> str:
    """`ipc://<fresh 0700 dir>/<name>.sock`; remove it with `remove_private_endpoint`.

    The directory is created under `base_dir`, else `$XDG_RUNTIME_DIR` (already private to
    the user) when it is usable and short enough, else the system temp dir.
    """
    sock_name = f"{name or 'engine'}.sock"
    if not _NAME_RE.match(sock_name):
        raise EndpointError(f"endpoint name {name!r}: use letters, digits, '.', '_' or '-'")
    for base in _candidate_bases(base_dir):
        directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getuid()}-", dir=base))
        path = directory / sock_name
        if len(os.fsencode(path)) <= MAX_IPC_PATH:
            _check_private(directory)
            return f"ipc://{path}"
        directory.rmdir()
    raise EndpointError(f"no base directory gives an ipc path under {MAX_IPC_PATH} bytes")


def remove_private_endpoint(endpoint: str) -> None:
    """Delete the socket file and the private directory `private_ipc_endpoint` made.

    Only directories named like ours (rlsync-<uid>-*) are removed; anything else is left alone.
    """
    if not endpoint.startswith("ipc://"):
        return
    directory = Path(endpoint[len("ipc://") :]).parent
    if directory.name.startswith(f"{_PREFIX}{os.getuid()}-"):
        shutil.rmtree(directory, ignore_errors=True)


def check_endpoint(endpoint: str) -> str:
    """Return `endpoint` if it is a usable ipc:// or tcp:// address, else raise EndpointError."""
    if not isinstance(endpoint, str) or not endpoint:
        raise EndpointError("endpoint is empty; expected ipc:///path/to.sock or tcp://host:port")
    if endpoint.startswith("ipc://"):
        return _check_ipc(endpoint)
    if endpoint.startswith("tcp://"):
        return _check_tcp(endpoint)
    raise EndpointError(f"endpoint {endpoint!r}: expected ipc:///path/to.sock or tcp://host:port")


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint; None for tcp://."""
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def _check_ipc(endpoint: str) -> str:
    path = endpoint[len("ipc://") :]
    if not path.startswith("/"):
        raise EndpointError(f"endpoint {endpoint!r}: ipc path must be absolute")
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise EndpointError(
            f"endpoint {endpoint!r}: ipc path is {len(os.fsencode(path))} bytes, "
            f"the unix socket limit is {MAX_IPC_PATH}"
        )
    if not Path(path).parent.is_dir():
        raise EndpointError(f"endpoint {endpoint!r}: directory {Path(path).parent} does not exist")
    return endpoint


def _check_tcp(endpoint: str) -> str:
    match = _TCP_RE.match(endpoint)
    if match is None:
        raise EndpointError(f"endpoint {endpoint!r}: expected tcp://host:port (port may be '*')")
    port = match.group("port")
    if port != "*" and not 1 <= int(port) <= 65535:
        raise EndpointError(f"endpoint {endpoint!r}: port {port} is not in 1..65535")
    return endpoint


def _candidate_bases(base_dir: str | os.PathLike | None) -> list[str]:
    if base_dir is not None:
        return [os.fspath(base_dir)]
    bases = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _is_private_dir(Path(runtime)):
        bases.append(runtime)
    return [*bases, tempfile.gettempdir(), "/tmp"]


def _is_private_dir(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def _check_private(directory: Path) -> None:
    """mkdtemp makes 0700 dirs; verify anyway, since the socket's safety depends on it."""
    st = directory.lstat()
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.getuid()
        or stat.S_IMODE(st.st_mode) != 0o700
    ):
        shutil.rmtree(directory, ignore_errors=True)
        raise EndpointError(
            f"{directory}: expected a 0700 directory owned by uid {os.getuid()}, "
            f"got mode {oct(stat.S_IMODE(st.st_mode))} owner {st.st_uid}"
        )
