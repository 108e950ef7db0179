"""The engine process: a ZMQ ROUTER socket around an EngineCore, driven by one busy loop.

The core holds all engine logic; this file only moves frames. It knows nothing about models,
KV or weights: it decodes requests, hands them to `core.process`, steps the core while it has
work, and routes every output back to the client that sent its request_id.

    python -m infer_side.process.server --model DIR [--backend rlsync|vllm] [--endpoint E]
                                [--kv-tokens N] [--device cpu] [--auth-keys DIR | --insecure-tcp]

prints `ready at ENDPOINT` on stdout once the model is loaded and the socket is bound.
A tcp:// endpoint needs `--auth-keys` (CURVE, see `rlsync.wire.auth`) unless `--insecure-tcp`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgpack
import zmq

from rlsync.wire.auth import AuthGuard, ServerKeys, load_server_keys, require_tcp_auth
from rlsync.wire.codec import MAX_FRAME_BYTES, ProtocolError, decode, encode
from rlsync.wire.endpoints import (
    check_endpoint,
    ipc_path,
    private_ipc_endpoint,
    remove_private_endpoint,
)
from rlsync.wire.protocol import EngineDied, Message, Result, is_final

log = logging.getLogger(__name__)

POLL_MS = 50
"""Longest sleep in poll when the core has no work (the core may ask for less)."""
UPDATE_WAKE_S = 0.0005
"""While an update is arriving: the longest a frame waits for the loop."""
SEND_LINGER_MS = 2000
"""On exit, how long queued replies (e.g. Shutdown's Result) may take to leave."""


class Core(Protocol):
    """What the server needs from an engine core (any `infer_side.engines.core_base.CoreBase`
    backend: `EngineCore`, `VllmCore`)."""

    shutdown_requested: bool

    def process(self, msg: Message) -> list[Message]: ...
    def step(self) -> list[Message]: ...
    def has_work(self) -> bool: ...
    def idle_wait_ms(self) -> int: ...
    def wait_for_update(self, timeout_s: float) -> None: ...
    def close(self) -> None: ...


def serve(
    core: Core,
    endpoint: str,
    ready_callback: Callable[[str], None] | None = None,
    *,
    context: zmq.Context | None = None,
    auth: ServerKeys | None = None,
) -> None:
    """Bind `endpoint`, call `ready_callback(bound_endpoint)`, run the loop until Shutdown.
    With `auth`, only CURVE clients on its allow-list can connect (others are logged)."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # drop bigger frames before buffering
    guard = AuthGuard(ctx, auth) if auth is not None else None
    bound = None
    try:
        if guard is not None:
            guard.secure(sock)
        sock.bind(check_endpoint(endpoint))
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if ready_callback is not None:
            ready_callback(bound)
        run_loop(core, Router(sock))
    finally:
        core.close()  # weight groups destroyed, IPC buffers unmapped, a receive cancelled
        if guard is not None:
            guard.close(sock)
        sock.close(linger=SEND_LINGER_MS)
        if bound is not None and ipc_path(bound) is not None:
            ipc_path(bound).unlink(missing_ok=True)  # zmq may not get to it before exit


def run_loop(core: Core, router: Router) -> None:
    """The busy loop: drain every pending frame -> core.process each -> core.step() if it has
    work -> route outputs to their senders -> sleep in poll only when idle.

    If anything raises (a core bug, SIGTERM), every client with a request in flight gets
    EngineDied so it fails fast, and the exception propagates (the process exits non-zero).
    After Shutdown, requests still in flight get EngineDied too.
    """
    try:
        while not core.shutdown_requested:
            for msg in router.drain():
                router.route(core.process(msg))
            if core.has_work():
                router.route(core.step())
            elif not core.shutdown_requested:
                _idle(core, router)
    except BaseException as exc:
        router.fail_all(f"engine crashed: {type(exc).__name__}: {exc}")
        raise
    router.fail_all("engine shut down before this request finished")


def _idle(core: Core, router: Router) -> None:
    """Sleep until a frame arrives; while a weight update's bytes arrive on a worker thread,
    alternate a non-blocking look at the socket with a short wait on the worker, so the
    commit follows the last byte at once (zmq's poll counts whole milliseconds)."""
    wait_ms = core.idle_wait_ms()
    if wait_ms > 0:
        router.sock.poll(min(POLL_MS, wait_ms), zmq.POLLIN)
    elif not router.sock.poll(0, zmq.POLLIN):
        core.wait_for_update(UPDATE_WAKE_S)


class Router:
    """Frames in and out of the ROUTER socket, and who asked for which request_id."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.owners: dict[str, bytes] = {}
        """request_id -> identity of the client awaiting it; dropped after the final reply."""

    def drain(self) -> list[Message]:
        """Every frame waiting on the socket, decoded; bad ones are answered here and skipped."""
        batch = []
        while True:
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return batch
            msg = self._accept(parts)
            if msg is not None:
                batch.append(msg)

    def route(self, outputs: list[Message]) -> None:
        """Send each output to the client that owns its request_id."""
        for out in outputs:
            identity = self.owners.get(out.request_id)
            if identity is None:
                log.warning(
                    "dropping %s for unknown request_id %r", type(out).__name__, out.request_id
                )
                continue
            if is_final(out):
                self.owners.pop(out.request_id, None)
            self._send(identity, out)

    def fail_all(self, message: str) -> None:
        """Tell every request still in flight that the engine is gone, so no client waits."""
        for rid, identity in self.owners.items():
            self._send(identity, EngineDied(request_id=rid, message=message))
        self.owners.clear()

    def _accept(self, parts: list[bytes]) -> Message | None:
        identity, frames = parts[0], parts[1:]
        if len(frames) != 1:
            return self._reject(identity, "", f"expected one frame per message, got {len(frames)}")
        try:
            msg = decode(frames[0])
        except ProtocolError as exc:
            return self._reject(identity, _guess_request_id(frames[0]), f"ProtocolError: {exc}")
        if not msg.request_id:
            return self._reject(identity, "", f"{type(msg).__name__}.request_id: must not be empty")
        if msg.request_id in self.owners:
            return self._reject(
                identity,
                msg.request_id,
                f"{type(msg).__name__}.request_id: {msg.request_id!r} is already in flight",
            )
        self.owners[msg.request_id] = identity
        return msg

    def _reject(self, identity: bytes, rid: str, message: str) -> None:
        log.warning("rejected a frame (request_id %r): %s", rid, message)
        self._send(identity, Result(request_id=rid, success=False, message=message))

    def _send(self, identity: bytes, msg: Message) -> None:
        try:
            frame = encode(msg)
        except Exception as exc:  # a core reply msgpack cannot hold; say so instead of dying
            frame = encode(
                Result(
                    request_id=msg.request_id,
                    success=False,
                    message=f"reply {type(msg).__name__} not encodable: {exc}",
                )
            )
        # ROUTER drops (never blocks on) messages to clients that are gone or too slow.
        self.sock.send_multipart([identity, frame], zmq.NOBLOCK)


def _guess_request_id(frame: bytes) -> str:
    """The request_id of an invalid frame, when its envelope is readable; else ""."""
    try:
        raw = msgpack.unpackb(frame, raw=False, max_str_len=1 << 16, max_bin_len=1 << 16)
        rid = raw[1]["request_id"]
    except Exception:  # any malformation just means "not attributable"
        return ""
    return rid if isinstance(rid, str) and len(rid) <= 128 else ""


# ---------------------------------------------------------------- process entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by `python -m infer_side.process.server` and `rlsync serve`."""
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument(
        "--endpoint",
        default=None,
        help="ipc:///path or tcp://host:port (default: private ipc:// socket)",
    )
    parser.add_argument(
        "--backend",
        choices=("rlsync", "vllm"),
        default="rlsync",
        help="our engine, or a real vLLM engine behind the same protocol",
    )
    parser.add_argument("--kv-tokens", type=int, default=4096, help="KV pool size in tokens")
    parser.add_argument(
        "--load-chunk-mb",
        type=float,
        default=256.0,
        help="vllm backend, in_place: MB of complete fused groups loaded at a time as they land",
    )
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument(
        "--private-weights",
        action="store_true",
        help="keep the weight stores in private memory: pushes stage through a buffer "
        "instead of writing them in place (our engine; vllm always stages)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: checkpoint's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: leave torch's default)",
    )
    parser.add_argument(
        "--disk-root",
        default=None,
        metavar="DIR",
        help="disk updates load only from paths under DIR (realpath; default: the system "
        "temp directory)",
    )
    parser.add_argument(
        "--auth-keys",
        default=None,
        metavar="DIR",
        help="CURVE key directory (python -m rlsync.wire.auth DIR): only clients in "
        "DIR/authorized_clients may connect; required for tcp://",
    )
    parser.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="serve tcp:// without authentication (trusted networks only)",
    )


def run_engine(args: argparse.Namespace) -> int:
    """Load the model, bind, print `ready at ENDPOINT`, serve until Shutdown. Returns the
    exit code: 0 after Shutdown, 1 if the core crashed, 2 for bad options (one `error:`
    line on stderr naming the option, never a traceback)."""
    try:
        keys = _server_keys(args)  # before the heavy imports: a refusal is immediate
    except ValueError as exc:
        return _bad_input(exc)
    import torch

    endpoint = args.endpoint or private_ipc_endpoint("engine")
    try:
        cfg = _engine_config(args, endpoint)
        check_model_dir(args.model)
        if args.threads:
            torch.set_num_threads(args.threads)
        core = _load_core(args.model, cfg)
    except ValueError as exc:  # ConfigError, ModelConfigError, WeightError, CheckpointError
        if args.endpoint is None:
            remove_private_endpoint(endpoint)
        return _bad_input(exc)
    try:
        if keys is None and endpoint.startswith("tcp://"):
            log.warning("serving %s WITHOUT authentication (--insecure-tcp)", endpoint)
        serve(core, endpoint, _print_ready, auth=keys)
    except zmq.ZMQError as exc:
        print(f"error: cannot serve on {endpoint}: {exc}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if args.endpoint is None:
            remove_private_endpoint(endpoint)
    return 0


def check_model_dir(model: str) -> None:
    """Raise ValueError naming --model unless it is a directory holding config.json: the
    two mistakes a user makes most, refused before any of the model is read."""
    path = Path(model)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise ValueError(f"--model {model}: {what}")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json (not a Hugging Face checkpoint)")


def _engine_config(args: argparse.Namespace, endpoint: str) -> Any:
    """The EngineConfig the options describe; ValueError names the bad one."""
    from rlsync.config import EngineConfig
    from rlsync.model_config import DTYPES
    from rlsync.transports.disk import disk_root

    check_endpoint(endpoint)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}: supported {sorted(DTYPES)}")
    if args.disk_root is not None:
        try:
            disk_root(args.disk_root)
        except ValueError:
            raise ValueError(f"--disk-root {args.disk_root}: not a directory") from None
    _check_device(args.device)
    return EngineConfig(  # a ConfigError (a ValueError) names the key: "kv_tokens: ..."
        backend=args.backend,
        load_chunk_mb=args.load_chunk_mb,
        expose_weights=not args.private_weights,
        kv_tokens=args.kv_tokens,
        max_running=args.max_running,
        device=args.device,
        dtype=args.dtype,
        endpoint=endpoint,
        disk_root=args.disk_root,
    )


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")


def _load_core(model: str, cfg: Any) -> Any:
    """The backend's core on the checkpoint; a checkpoint that does not load raises
    ValueError naming --model (bad config, missing or mismatched tensors, bad files)."""
    from infer_side.engines.weights import WeightError
    from rlsync.checkpoint_io import CheckpointError
    from rlsync.model_config import ModelConfigError

    try:
        return _core_class(cfg.backend).from_checkpoint(model, cfg, exposed=cfg.expose_weights)
    except (ModelConfigError, WeightError, CheckpointError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {model}: {exc}") from None


def _bad_input(exc: Exception) -> int:
    text = " ".join(str(exc).split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr)
    return 2


def _core_class(backend: str) -> Any:
    """The engine backend's core (imported only when used: vLLM is heavy and optional)."""
    if backend == "vllm":
        from infer_side.engines.vllm.vllm_core import VllmCore

        return VllmCore
    from infer_side.engines.native.engine_core import EngineCore

    return EngineCore


def _server_keys(args: argparse.Namespace) -> ServerKeys | None:
    """--auth-keys loaded; a tcp:// endpoint without them is refused unless --insecure-tcp."""
    keys = load_server_keys(args.auth_keys) if args.auth_keys else None
    if args.endpoint:
        require_tcp_auth(check_endpoint(args.endpoint), keys, args.insecure_tcp)
    return keys


def _print_ready(endpoint: str) -> None:
    print(f"ready at {endpoint}", flush=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, closing the socket


def run_foreground(args: argparse.Namespace) -> int:
    """`run_engine` as a process's main job: logs to stderr, SIGTERM exits cleanly."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return run_engine(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infer_side.process.server", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run_foreground(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
