"""Talk to an engine process: typed methods over `rlsync.wire.rpc.RpcClient`, and `launch_engine`.

    with launch_engine(model_dir, kv_tokens=2048) as engine:
        outs = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8))
        engine.flush_cache()

Control methods raise `RpcError` when the engine says no, `RpcTimeout` when it does not answer
and `EngineDead` when its process is gone. Generation never raises for a rejected request:
its output carries `error`. Nothing here knows how the engine works inside.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import IO, TypeVar

from rlsync.procs import child_env, reap
from rlsync.wire.auth import ClientKeys, load_client_keys
from rlsync.wire.codec import ProtocolError
from rlsync.wire.endpoints import (
    EndpointError,
    check_endpoint,
    ipc_path,
    private_ipc_endpoint,
    remove_private_endpoint,
)
from rlsync.wire.protocol import (
    WEIGHTS_INCOMPLETE,
    Abort,
    ContinueGeneration,
    EngineInfo,
    FlushCache,
    Generate,
    GenerateOutput,
    GetInfo,
    GetWeightsFingerprint,
    GetWeightSpecs,
    Message,
    PauseGeneration,
    PauseMode,
    SamplingParams,
    Shutdown,
    WeightFingerprints,
    WeightSpecs,
)
from rlsync.wire.rpc import EngineDead, RpcClient, RpcTimeout

M = TypeVar("M", bound=Message)

READY_PREFIX = "ready at "
RETRY_FIRST_S, RETRY_MAX_S = 0.01, 0.25
"""`generate_through_updates`: first pause before sending refused requests again, and the
longest (it doubles in between)."""


class EngineStartError(RuntimeError):
    """The engine process exited or stayed silent before printing `ready at`."""


class EngineUnreachable(ConnectionError):
    """No engine listens at the endpoint (its ipc socket file does not exist)."""


UNREACHABLE_ERRORS = (EndpointError, EngineUnreachable, EngineStartError, RpcTimeout, EngineDead)
"""Errors meaning "could not talk to an engine" (as opposed to RpcError: the engine said no)."""


class EngineClient:
    """Typed calls to one engine; owns the engine's process when `launch_engine` started it."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 120.0,
        process: subprocess.Popen | None = None,
        owns_endpoint: bool = False,
        logs: tuple[IO[bytes], IO[bytes]] | None = None,
        auth: ClientKeys | None = None,
    ):
        self.endpoint = endpoint
        self.process = process
        liveness = (lambda: process.poll() is None) if process is not None else None
        self.rpc = RpcClient(endpoint, timeout_s=timeout_s, liveness=liveness, auth=auth)
        self._logs = logs
        self._cleanup = weakref.finalize(
            self, _reap, process, endpoint if owns_endpoint else None, self.rpc, logs
        )

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> list[GenerateOutput]:
        """One finished output per prompt, in prompt order."""
        requests = _requests(prompts, sampling, stream=False)
        index = {req.request_id: i for i, req in enumerate(requests)}
        results: list[GenerateOutput | None] = [None] * len(requests)
        for out in self.rpc.generate(requests, timeout_s):
            results[index[out.request_id]] = out
        assert all(out is not None for out in results), "rpc.generate ends when all finished"
        return results  # type: ignore[return-value]

    def generate_stream(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[tuple[int, GenerateOutput]]:
        """(prompt index, chunk) as tokens arrive; each chunk holds only the new tokens, and
        the last chunk of a prompt has `finished=True`. `chunk.request_id` can be aborted."""
        requests = _requests(prompts, sampling, stream=True)
        index = {req.request_id: i for i, req in enumerate(requests)}
        for out in self.rpc.generate(requests, timeout_s):
            yield index[out.request_id], out

    # ------------------------------------------------------------ control

    def abort(self, request_id: str) -> Message:
        return self.rpc.call_ok(Abort(target_id=request_id))

    def flush_cache(self, empty_cache: bool = True) -> Message:
        """Reset the prefix cache and KV pool (fails unless the engine is idle)."""
        return self.rpc.call_ok(FlushCache(empty_cache=empty_cache))

    def pause(self, mode: PauseMode = "abort") -> Message:
        return self.rpc.call_ok(PauseGeneration(mode=mode))

    def continue_generation(self) -> Message:
        return self.rpc.call_ok(ContinueGeneration())

    def info(self) -> EngineInfo:
        """Weight version, model config, KV pool and prefix-cache usage."""
        return _expect(self.rpc.call_ok(GetInfo()), EngineInfo)

    def fingerprints(self, names: list[str] | None = None) -> WeightFingerprints:
        """Per-tensor fingerprints of the live weights (None: every tensor; []: none) and
        the weight state (version, incomplete, update in progress)."""
        return _expect(self.rpc.call_ok(GetWeightsFingerprint(names=names)), WeightFingerprints)

    def weight_specs(self) -> WeightSpecs:
        """Every tensor an update must carry: Hugging Face name, dtype, shape."""
        return _expect(self.rpc.call_ok(GetWeightSpecs()), WeightSpecs)

    def shutdown(self, timeout_s: float | None = None) -> Message:
        """Ask the engine to stop; waits for its process to exit when this client started it."""
        result = self.rpc.call_ok(Shutdown(), timeout_s)
        if self.process is not None:
            self.process.wait(timeout=self.rpc.timeout_s if timeout_s is None else timeout_s)
        return result

    # ------------------------------------------------------------ lifetime

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        """The end of the engine process's stderr (only when launch_engine started it)."""
        return _tail(self._logs[1], max_bytes) if self._logs else ""

    def close(self, grace_s: float = 5.0) -> None:
        """Close the socket; stop the process this client started (Shutdown, then terminate,
        then kill) and remove its private endpoint directory. Safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.rpc.call(Shutdown(), timeout_s=grace_s)
                self.process.wait(timeout=grace_s)
            except (RpcTimeout, EngineDead, RuntimeError, subprocess.TimeoutExpired):
                pass  # _reap terminates it
        self._cleanup()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    endpoint: str, *, timeout_s: float = 120.0, auth_keys: str | os.PathLike | None = None
) -> EngineClient:
    """A client of an engine already running at `endpoint` (not owned: close leaves it up).
    `auth_keys`: key directory with client.key_secret and server.key (`rlsync.wire.auth`)."""
    check_reachable(endpoint)
    auth = load_client_keys(auth_keys) if auth_keys is not None else None
    return EngineClient(endpoint, timeout_s=timeout_s, auth=auth)


def check_reachable(endpoint: str) -> None:
    """Raise at once when nothing can answer at `endpoint`: EndpointError when it is
    malformed, EngineUnreachable when its ipc socket does not exist or is not a socket. A
    caller then says so instead of waiting out its timeout. (Not probed: tcp://, and a
    socket file whose engine was killed; a probe would be logged as a failed handshake by
    an engine served with --auth-keys. Those cost the caller's bounded timeout.)"""
    check_endpoint(endpoint)
    path = ipc_path(endpoint)
    if path is not None and not path.is_socket():
        what = "is not a socket" if path.exists() else "does not exist"
        raise EngineUnreachable(f"no engine at {endpoint}: {path} {what}")


def launch_engine(
    model_dir: str | os.PathLike,
    *,
    endpoint: str | None = None,
    kv_tokens: int = 4096,
    backend: str = "rlsync",
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 120.0,
    call_timeout_s: float = 120.0,
    auth_keys: str | os.PathLike | None = None,
    insecure_tcp: bool = False,
    disk_root: str | os.PathLike | None = None,
) -> EngineClient:
    """Start `python -m infer_side.process.server` and return a client once it prints `ready at`.

    Without `endpoint` the engine listens on a fresh private ipc:// socket that the client
    removes on close. Raises EngineStartError (with the engine's stderr tail) if the process
    dies or is not ready within `start_timeout_s`.

    `auth_keys` (a `rlsync.wire.auth` key directory): the engine accepts only CURVE clients it
    lists, and this client uses the directory's client key. A tcp:// endpoint without keys
    is refused (EngineStartError) unless `insecure_tcp=True`. `backend="vllm"` serves a real
    vLLM engine behind the same protocol (`infer_side.engines.vllm.vllm_core`). `disk_root`: disk updates
    load only from under it (None: the system temp directory; docs/PROTOCOL.md, Disk root).
    """
    auth = load_client_keys(auth_keys) if auth_keys is not None else None
    owns_endpoint = endpoint is None
    endpoint = endpoint or private_ipc_endpoint("engine")
    insecure = insecure_tcp and auth is None and endpoint.startswith("tcp://")
    cmd = [
        sys.executable,
        "-m",
        "infer_side.process.server",
        "--model",
        os.path.abspath(model_dir),
        "--endpoint",
        endpoint,
        "--kv-tokens",
        str(kv_tokens),
        "--device",
        device,
        "--backend",
        backend,
        *(["--dtype", dtype] if dtype else []),
        *(["--threads", str(threads)] if threads else []),
        *(["--auth-keys", os.path.abspath(auth_keys)] if auth_keys is not None else []),
        *(["--insecure-tcp"] if insecure else []),
        *(["--disk-root", os.path.abspath(disk_root)] if disk_root is not None else []),
        *extra_args,
    ]
    logs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
    process = None
    try:
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logs[0], stderr=logs[1], env=child_env()
        )
        bound = _wait_ready(process, logs, start_timeout_s)
    except BaseException:
        _reap(process, endpoint if owns_endpoint else None, None, logs)
        raise
    return EngineClient(
        bound,
        timeout_s=call_timeout_s,
        process=process,
        owns_endpoint=owns_endpoint,
        logs=logs,
        auth=auth,
    )


def _expect(reply: Message, cls: type[M]) -> M:
    """`reply` as a snapshot of engine state: checked to be a `cls`, its request id dropped
    (so two snapshots of the same state compare equal)."""
    if not isinstance(reply, cls):
        raise ProtocolError(type(reply).__name__, f"expected {cls.__name__}")
    return dataclasses.replace(reply, request_id="")


def generate_through_updates(
    client: EngineClient,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams],
    timeout_s: float,
) -> list[GenerateOutput]:
    """`client.generate`, sending again each request refused because an in_place update was
    writing the weights (nothing of it ran), with the same sampling (seed included), until
    every one is served or `timeout_s` has passed; then refusals are returned as they are.
    The RL loop needs it: rollouts submitted ahead may reach an engine mid-push."""
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * len(prompts)
    deadline = time.monotonic() + timeout_s
    results = client.generate(prompts, sampling, timeout_s=timeout_s)
    pause = RETRY_FIRST_S
    while True:
        again = [i for i, out in enumerate(results) if out.error.startswith(WEIGHTS_INCOMPLETE)]
        left = deadline - time.monotonic() - pause
        if not again or left <= 0:
            return results
        time.sleep(pause)
        pause = min(2 * pause, RETRY_MAX_S)
        redo = client.generate(
            [prompts[i] for i in again], [sampling[i] for i in again], timeout_s=left
        )
        for i, out in zip(again, redo, strict=True):
            results[i] = out


def _requests(
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] | None,
    stream: bool,
) -> list[Generate]:
    if sampling is None or isinstance(sampling, SamplingParams):
        sampling = [sampling or SamplingParams()] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(sampling)} SamplingParams")
    return [
        Generate(request_id=os.urandom(16).hex(), input_ids=list(p), sampling=s, stream=stream)
        for p, s in zip(prompts, sampling, strict=True)
    ]


def _wait_ready(
    process: subprocess.Popen, logs: tuple[IO[bytes], IO[bytes]], timeout_s: float
) -> str:
    """Poll the engine's stdout for the `ready at` line; return the endpoint it names."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in _tail(logs[0], 1 << 16).splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip()
        if process.poll() is not None:
            raise EngineStartError(
                f"engine exited with code {process.returncode} before it was "
                f"ready; stderr tail:\n{_tail(logs[1], 4000)}"
            )
        time.sleep(0.02)
    raise EngineStartError(
        f"engine not ready within {timeout_s:g} s; stderr tail:\n{_tail(logs[1], 4000)}"
    )


def _tail(log: IO[bytes], max_bytes: int) -> str:
    """Last bytes of a log file the child writes to (pread: our offset is the child's too)."""
    if log.closed:
        return ""
    size = os.fstat(log.fileno()).st_size
    start = max(0, size - max_bytes)
    return os.pread(log.fileno(), size - start, start).decode(errors="replace")


def _reap(
    process: subprocess.Popen | None,
    endpoint: str | None,
    rpc: RpcClient | None,
    logs: tuple[IO[bytes], IO[bytes]] | None,
) -> None:
    """Stop the process (terminate, then kill), close the socket, remove the private dir."""
    reap(process, timeout_s=5.0)
    if rpc is not None:
        rpc.close()
    if endpoint is not None:
        remove_private_endpoint(endpoint)
    for log in logs or ():
        log.close()
