"""`rlsync submit CONFIG --address http://HEAD:8265 [--set key=value ...]`: the same RL run as a
Ray job on a cluster.

What is sent: the resolved config (overrides applied, `ray_address=auto`, `run_dir` made
absolute) as config.yaml in a small staging working_dir, and our three packages (rlsync,
trainer_side, infer_side) as `py_modules`: never the repo's venv, runs/ or .git, and nothing
that .gitignore would silently drop. The cluster's Python must already have the dependencies
(torch, pyzmq, msgpack, safetensors, ray). The job runs `rlsync run config.yaml` on the
head node; the run directory must be writable there (and, across nodes, on shared storage).

Without --address, `--local` starts a throwaway single-node cluster (`LocalHead`, also used by
the tests) under runs/NAME/cluster, submits to it and stops it, and only it, afterwards. Token auth: pass --auth-token-file (or set
RAY_AUTH_TOKEN_PATH) when the cluster uses it. Exit code: 0 job succeeded, 1 failed or timed
out (the job is stopped), 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rlsync.wire.netutil import free_port

PACKAGES = ("rlsync", "trainer_side", "infer_side")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit the RL run as a Ray job to a cluster",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("config", nargs="?", default=None, help="YAML run config")
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's job API, e.g. http://HEAD:8265 (Ray dashboard port)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="start a throwaway local cluster, submit to it, stop it afterwards",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--run-dir",
        default=None,
        help="run_dir as the job sees it (default: this run_dir, made absolute)",
    )
    p.add_argument("--python", default="python", help="Python on the cluster nodes")
    p.add_argument("--auth-token-file", default=None, help="the cluster's Ray auth token file")
    p.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600.0,
        help="seconds to wait for the job before stopping it",
    )
    p.add_argument("--no-wait", action="store_true", help="submit and return the job id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rlsync.app.run_config import ConfigError, load_config

    if (args.address is None) == (not args.local):
        print("error: give exactly one of --address URL or --local", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, [*args.overrides, "ray_address=auto"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg.run_dir = args.run_dir or str(Path(cfg.run_dir).resolve())
    if args.auth_token_file:
        os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray when it is first imported below
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(args.auth_token_file).resolve())
    if not args.local:
        return submit_and_follow(cfg, args.address, args)
    return _submit_local(cfg, args)


def _submit_local(cfg: Any, args: argparse.Namespace) -> int:
    root = Path(cfg.run_dir) / cfg.name / "cluster"
    # Ray reads the auth mode once, when first imported: set it before the import below.
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "auth_token")})
    head = LocalHead(root, num_cpus=max(4, cfg.trainer.world_size + cfg.num_engines))
    head.start()
    try:
        print(f"local Ray head at {head.address}, jobs at {head.dashboard_url}", flush=True)
        return submit_and_follow(cfg, head.dashboard_url, args)
    finally:
        head.stop()


def runtime_env(staging: Path) -> dict[str, Any]:
    """working_dir = the staging dir (config.yaml only); our packages as py_modules."""
    import importlib

    modules = [str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES]
    return {
        "working_dir": str(staging),
        "py_modules": modules,
        "excludes": ["__pycache__", "*.pyc"],
    }


def entrypoint(python: str) -> str:
    """The job's command: `rlsync run config.yaml` through the uploaded rlsync package."""
    return shlex.join([python, "-m", "rlsync.cli", "run", "config.yaml"])


def submit_and_follow(cfg: Any, address: str, args: argparse.Namespace) -> int:
    import yaml
    from ray.job_submission import JobSubmissionClient

    from rlsync.app.run_config import to_dict

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="rlsync-job-") as tmp:
        staging = Path(tmp)
        (staging / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        job_id = client.submit_job(
            entrypoint=entrypoint(args.python),
            runtime_env=runtime_env(staging),
            submission_id=f"rlsync-{cfg.name}-{int(time.time())}",
        )
    print(f"submitted {job_id} to {address}; run dir {Path(cfg.run_dir) / cfg.name}", flush=True)
    if args.no_wait:
        return 0
    return follow(client, job_id, args.timeout)


def follow(client: Any, job_id: str, timeout_s: float) -> int:
    """Print the job's logs as they grow until it ends; stop it if it outlives `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}", flush=True)
            return 0 if status == "SUCCEEDED" else 1
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            print(
                f"job {job_id}: still {status} after {timeout_s:g} s; stopped it", file=sys.stderr
            )
            return 1
        time.sleep(0.5)


# ---------------------------------------------------------------- a throwaway local cluster


class LocalHead:
    """A single-node Ray cluster started with `ray start --head --block` in its own process
    group, every file under `root` (temp dir via a short symlink, auth token), every port
    chosen free. `stop` ends exactly this cluster: SIGTERM to its `ray start`, then SIGKILL
    to whatever is left in its process group. Used by `rlsync submit --local` and tests."""

    def __init__(self, root: Path, num_cpus: int = 4, host: str = "127.0.0.1") -> None:
        self.root, self.num_cpus, self.host = root.resolve(), num_cpus, host
        self.ports = {name: free_port(host) for name in _HEAD_PORTS}
        self.process: subprocess.Popen | None = None
        self.link_dir: Path | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.ports['port']}"

    @property
    def dashboard_url(self) -> str:
        """Where `ray job submit` / JobSubmissionClient talk to this cluster."""
        return f"http://{self.host}:{self.ports['dashboard-port']}"

    def client_env(self) -> dict[str, str]:
        """Environment a client of this cluster needs (token auth)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token")}

    def start(self, timeout_s: float = 120.0) -> LocalHead:
        from rlsync.app.ray_session import short_link

        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.link_dir = short_link(self.root).parent
        ports = [f"--{name}={port}" for name, port in self.ports.items()]
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.host}",
            f"--temp-dir={self.link_dir / 'r'}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={self.host}",
            "--disable-usage-stats",
            *ports,
        ]
        log = (self.root / "ray_start.log").open("wb")
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self._env(),
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        return self

    def _env(self) -> dict[str, str]:
        """Token auth, and this Python first on PATH: the jobs' `python` is ours."""
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **self.client_env(), "PATH": path}

    def _wait_ready(self, timeout_s: float) -> None:
        """Up when the dashboard's HTTP server answers (401 counts: auth is on)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"ray start exited with {self.process.returncode}; see "
                    f"{self.root / 'ray_start.log'}"
                )
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"local Ray head not up within {timeout_s:g} s; see {self.root / 'ray_start.log'}"
        )

    def stop(self, grace_s: float = 3.0) -> None:
        """End this cluster only: SIGTERM to its process group (all its daemons, workers and
        engines), SIGKILL to whatever is left after `grace_s`. Safe to call twice."""
        if self.process is not None:
            pgid = self.process.pid  # start_new_session: the group id is the leader's pid
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(min(grace_s, 1.0))  # let the daemons exit on their own
            _signal_group(pgid, signal.SIGKILL)
            self.process.wait()
            self.process = None
        if self.link_dir is not None:
            shutil.rmtree(self.link_dir, ignore_errors=True)
            self.link_dir = None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
