"""CURVE authentication for tcp:// engine endpoints: key files, socket setup, and the
server's guard thread (ZAP allow-list + handshake-failure log).

Why CURVE and not an HMAC on every frame: libzmq checks the client's key during the
handshake, so a frame from an unknown peer never reaches the engine's loop or the codec;
the traffic is also encrypted, the wire format and `docs/PROTOCOL.md` stay unchanged, and
there is no per-frame nonce/replay bookkeeping of our own to get wrong.

A key directory (make one with `python -m rlsync.wire.auth DIR`) holds:

    server.key            the engine's public key (give it to clients)
    server.key_secret     the engine's keypair (mode 0600, only the engine reads it)
    client.key_secret     a client's keypair (trainer / tooling side)
    authorized_clients/   one <name>.key per client public key the engine accepts

The same directory works for both sides on one machine; split it across machines as the
file names say. Keys are always passed in explicitly (a directory path through the
constructors and `--auth-keys DIR`); nothing here reads the environment. ipc:// endpoints
rely on their private 0700 directory instead (`rlsync.wire.endpoints`).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

SERVER_PUBLIC, SERVER_SECRET = "server.key", "server.key_secret"
CLIENT_SECRET = "client.key_secret"
ALLOWED_DIR = "authorized_clients"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"rlsync"
LOG_EVERY_S = 2.0
"""A client that keeps failing reconnects every 100 ms; log its failures once per this."""
_PROTOCOL_ERRORS = {
    int(getattr(zmq, n)): n[len("PROTOCOL_ERROR_") :].lower()
    for n in dir(zmq)
    if n.startswith("PROTOCOL_ERROR_")
}
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class AuthError(ValueError):
    """Missing, unreadable or unsafe key material, or tcp:// without any; says which."""


@dataclass(frozen=True)
class ServerKeys:
    """An engine's CURVE keypair (z85) and the raw 32-byte client keys it accepts."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE keypair and the public key of the engine it talks to (all z85)."""

    public: bytes
    secret: bytes
    server_public: bytes


# ---------------------------------------------------------------- key files


def generate_keys(directory: str | os.PathLike, clients: tuple[str, ...] = ("client",)) -> Path:
    """Create a 0700 key directory: the engine's keypair, one keypair per client (the first
    is also written as `client.key_secret`) and the allow-list of their public keys."""
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    allowed = root / ALLOWED_DIR
    allowed.mkdir(mode=0o700, exist_ok=True)
    zmq.auth.create_certificates(root, "server")
    for i, name in enumerate(clients):
        public_file, secret_file = zmq.auth.create_certificates(root, name)
        os.replace(public_file, allowed / f"{name}.key")
        if i == 0 and name != "client":
            os.replace(secret_file, root / CLIENT_SECRET)
    for secret in root.glob("*.key_secret"):
        os.chmod(secret, 0o600)
    return root


def load_server_keys(directory: str | os.PathLike) -> ServerKeys:
    """The engine's keypair and allow-list from `directory`; AuthError names what is wrong."""
    root = Path(directory)
    public, secret = _load_pair(root / SERVER_SECRET)
    allowed = sorted((root / ALLOWED_DIR).glob("*.key")) if (root / ALLOWED_DIR).is_dir() else []
    if not allowed:
        raise AuthError(f"{root / ALLOWED_DIR}: no client public keys (*.key) to accept")
    keys = frozenset(z85.decode(_load_public(p)) for p in allowed)
    return ServerKeys(public=public, secret=secret, allowed=keys)


def load_client_keys(directory: str | os.PathLike) -> ClientKeys:
    """A client's keypair and the engine's public key from `directory`."""
    root = Path(directory)
    public, secret = _load_pair(root / CLIENT_SECRET)
    return ClientKeys(
        public=public, secret=secret, server_public=_load_public(root / SERVER_PUBLIC)
    )


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    _check_secret_file(path)
    public, secret = _read_cert(path)
    if secret is None:
        raise AuthError(f"{path}: holds no secret key")
    return public, secret


def _load_public(path: Path) -> bytes:
    return _read_cert(path)[0]


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise AuthError(
            f"{path}: key file not found (make keys with `python -m rlsync.wire.auth DIR`)"
        )
    try:
        public, secret = zmq.auth.load_certificate(path)
        z85.decode(public)
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: not a CURVE key file ({exc})") from None
    if public is None or len(public) != 40:
        raise AuthError(f"{path}: not a CURVE key file (no 40-character public-key)")
    return public, secret


def _check_secret_file(path: Path) -> None:
    """Like ssh: refuse a secret key that someone else can read or that is not ours."""
    try:
        st = path.stat()
    except OSError:
        raise AuthError(
            f"{path}: key file not found (make keys with `python -m rlsync.wire.auth DIR`)"
        ) from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AuthError(
            f"{path}: secret key must be owned by uid {os.getuid()} with mode 0600, "
            f"got mode {oct(stat.S_IMODE(st.st_mode))} owner {st.st_uid}"
        )


# ---------------------------------------------------------------- sockets


def require_tcp_auth(endpoint: str, keys: object | None, insecure_tcp: bool) -> None:
    """Refuse a tcp:// endpoint without key material unless insecure mode was asked for."""
    if endpoint.startswith("tcp://") and keys is None and not insecure_tcp:
        raise AuthError(
            f"{endpoint}: tcp:// endpoints require authentication; pass --auth-keys "
            f"DIR (make one with `python -m rlsync.wire.auth DIR`) or, on a trusted "
            f"network only, --insecure-tcp"
        )


def secure_client_socket(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make `sock` (before connect) a CURVE client of the engine `keys.server_public`."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


class AuthGuard:
    """Makes one server socket CURVE-only and answers its ZAP requests from the allow-list,
    on a thread of its own; every rejected connection is logged (rate-limited)."""

    def __init__(self, context: zmq.Context, keys: ServerKeys):
        self.keys = keys
        self._zap = context.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self._mon: zmq.Socket | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auth-guard", daemon=True)
        self._last_log: dict[str, tuple[float, int]] = {}

    def secure(self, sock: zmq.Socket) -> None:
        """Configure `sock` (before bind) as a CURVE server and start guarding it."""
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.zap_domain = ZAP_DOMAIN
        self._mon = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._thread.start()

    def close(self, sock: zmq.Socket | None = None) -> None:
        """Stop the thread and close its sockets (call before closing `sock`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if sock is not None and self._mon is not None:
            sock.disable_monitor()
        for s in (self._zap, self._mon):
            if s is not None:
                s.close(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                if sock is self._zap:
                    self._answer(self._zap.recv_multipart())
                else:
                    self._on_event(recv_monitor_message(sock))

    def _answer(self, frames: list[bytes]) -> None:
        """ZAP (RFC 27): [version, id, domain, address, identity, mechanism, credentials...]."""
        frames = frames + [b""] * (6 - len(frames))  # malformed: still answer (REP), and deny
        request_id, address, mechanism = frames[1], frames[3], frames[5]
        key = frames[6] if mechanism == b"CURVE" and len(frames) > 6 else b""
        ok = bool(key) and key in self.keys.allowed
        if not ok:
            who = z85.encode(key).decode() if len(key) == 32 else mechanism.decode(errors="replace")
            self._warn(
                "zap",
                f"auth: rejected a {mechanism.decode(errors='replace')} client from "
                f"{address.decode(errors='replace')}: key {who} is not allowed",
            )
        status = (b"200", b"OK") if ok else (b"400", b"client key not allowed")
        user = z85.encode(key) if ok else b""
        self._zap.send_multipart([b"1.0", request_id, *status, user, b""])

    def _on_event(self, event: dict) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # already logged by _answer, with the key
        value = int(event["value"])  # a ZMTP protocol error code, or an errno
        reason = _PROTOCOL_ERRORS.get(value) or os.strerror(value)
        self._warn(
            reason,
            f"auth: rejected a connection to {event['endpoint'].decode()}: "
            f"CURVE handshake failed ({reason}; an unauthenticated client, or one "
            f"that does not know this engine's public key)",
        )

    def _warn(self, kind: str, text: str) -> None:
        now = time.monotonic()
        last, skipped = self._last_log.get(kind, (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            self._last_log[kind] = (last, skipped + 1)
            return
        suffix = f" (+{skipped} similar in the last {LOG_EVERY_S:g} s)" if skipped else ""
        log.warning("%s%s", text, suffix)
        self._last_log[kind] = (now, 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m rlsync.wire.auth DIR [CLIENT ...]`: create a key directory."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print("usage: python -m rlsync.wire.auth DIR [CLIENT_NAME ...]", file=sys.stderr)
        return 2
    root = generate_keys(args[0], tuple(args[1:]) or ("client",))
    print(
        f"keys in {root}: give {root / SERVER_PUBLIC} and a client's key_secret to clients; "
        f"the engine reads {SERVER_SECRET} and {ALLOWED_DIR}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
