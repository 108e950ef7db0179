"""`rlsync serve / generate / info / flush` as a user runs them: real processes, real sockets."""

from __future__ import annotations

import dataclasses
import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infer_side.process.client import EngineClient, connect
from rlsync.wire.endpoints import ipc_path
from rlsync.wire.protocol import Generate, GenerateOutput, SamplingParams
from tests.checkpoints import make_hf_checkpoint

pytestmark = pytest.mark.timeout(180)

_SCRIPT = Path(sys.executable).with_name("rlsync")
RLSYNC = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "import sys; from rlsync.cli import main; sys.exit(main())"]
)
PROMPTS = ["1,2,3", "4,5,6,7,8"]


@dataclass
class Served:
    process: subprocess.Popen
    endpoint: str
    client: EngineClient


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RLSYNC, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    """`rlsync serve` in the foreground of a child process; stopped with Shutdown."""
    proc = subprocess.Popen(
        [*RLSYNC, "serve", "--model", str(checkpoint), "--kv-tokens", "2048", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = _first_line(proc, timeout_s=120)
        assert line.startswith("ready at "), line
        endpoint = line[len("ready at ") :]
        with connect(endpoint, timeout_s=60) as client:
            yield Served(proc, endpoint, client)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no output from `rlsync serve` within {timeout_s} s"
    return proc.stdout.readline().strip()


def expected_records(outs: list[GenerateOutput], prompts: list[list[int]]) -> list[dict]:
    return [
        {
            "input_ids": p,
            "output_ids": o.output_ids,
            "logprobs": o.logprobs,
            "finish_reason": o.finish_reason,
            "prompt_tokens": o.prompt_tokens,
            "cached_tokens": o.cached_tokens,
            "weight_version": o.weight_version,
            "min_weight_version": o.min_weight_version,
            "error": o.error,
            "version_spans": [[s.version, s.tokens] for s in o.version_spans],
        }
        for p, o in zip(prompts, outs, strict=True)
    ]


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Equal, with logprobs to 1e-4: batches can split differently across engine steps."""
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
        assert {k: v for k, v in g.items() if k != "logprobs"} == {
            k: v for k, v in w.items() if k != "logprobs"
        }


def generate_args(*where: str) -> list[str]:
    ids = [arg for p in PROMPTS for arg in ("--input-ids", p)]
    return [
        "generate",
        *where,
        *ids,
        "--max-new-tokens",
        "5",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--json",
    ]


def client_records(client: EngineClient) -> list[dict]:
    prompts = [[int(t) for t in p.split(",")] for p in PROMPTS]
    sampling = SamplingParams(max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    client.flush_cache()
    return expected_records(client.generate(prompts, sampling), prompts)


def test_serve_prints_ready_at_a_private_endpoint(served):
    assert served.endpoint.startswith("ipc://") and ipc_path(served.endpoint).is_socket()
    assert ipc_path(served.endpoint).parent.stat().st_mode & 0o077 == 0


def test_generate_json_equals_the_python_client(served):
    assert cli("flush", "--endpoint", served.endpoint).returncode == 0
    run = cli(*generate_args("--endpoint", served.endpoint))
    assert run.returncode == 0, run.stderr
    assert_same_records(json.loads(run.stdout), client_records(served.client))


def test_generate_with_model_runs_a_temporary_engine(served, checkpoint):
    run = cli(*generate_args("--model", str(checkpoint), "--threads", "1"))
    assert run.returncode == 0, run.stderr
    assert_same_records(json.loads(run.stdout), client_records(served.client))
    assert _server_processes(checkpoint) == [], "the temporary engine outlived the command"


def _server_processes(checkpoint: Path) -> list[int]:
    """Pids of `python -m infer_side.process.server` processes serving `checkpoint`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"infer_side.process.server" in args and str(checkpoint).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def test_text_output_of_generate_and_info(served):
    run = cli(
        "generate", "--endpoint", served.endpoint, "--input-ids", "1,2,3", "--max-new-tokens", "3"
    )
    assert run.returncode == 0 and "finish=length" in run.stdout and "version=0" in run.stdout
    run = cli("info", "--endpoint", served.endpoint)
    assert run.returncode == 0 and "weight_version: 0" in run.stdout
    assert "kv_pool_size: 2048" in run.stdout and "model:" in run.stdout


def test_info_json_has_version_model_and_cache_usage(served):
    run = cli("info", "--endpoint", served.endpoint, "--json")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["weight_version"] == 0 and info["model"]["vocab_size"] == 96
    assert info["kv_pool_size"] == 2048 and info["prefix_cache_tokens"] >= 0
    assert info["kv_pool_used"] <= info["kv_pool_size"]
    assert info == dataclasses.asdict(served.client.info())


def test_flush_exit_codes(served):
    run = cli("flush", "--endpoint", served.endpoint, "--no-empty-cache")
    assert run.returncode == 0 and "flushed" in run.stdout
    served.client.pause("in_place")  # a queued request keeps the engine busy
    sent = served.client.rpc.send(
        Generate(input_ids=[1, 2], sampling=SamplingParams(max_new_tokens=2))
    )
    run = cli("flush", "--endpoint", served.endpoint)
    assert run.returncode == 1 and "waiting" in run.stderr, run.stderr
    served.client.continue_generation()
    out = served.client.rpc.recv(timeout_s=60)
    assert out.request_id == sent.request_id and len(out.output_ids) == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["info", "--endpoint", "ipc:///nonexistent-dir/x.sock"], "does not exist"),
        (["flush", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.5"], "no reply"),
        (["info", "--endpoint", "nonsense"], "expected ipc"),
        (["info", "--endpoint", "tcp://127.0.0.1:9", "--auth-keys", "/nonexistent"], "not found"),
        (["generate", "--endpoint", "ipc:///tmp/x.sock"], "--input-ids"),
        (["generate", "--endpoint", "ipc:///tmp/x.sock", "--input-ids", "1,x"], "comma-separated"),
        (
            [
                "generate",
                "--endpoint",
                "ipc:///tmp/x.sock",
                "--input-ids",
                "1",
                "--max-new-tokens",
                "0",
            ],
            "max_new_tokens",
        ),
    ],
)
def test_unreachable_and_bad_usage_exit_2(args, words):
    run = cli(*args)
    assert run.returncode == 2 and words in run.stderr, (run.returncode, run.stderr)


def test_serve_exits_0_after_shutdown(served):
    directory = ipc_path(served.endpoint).parent
    assert served.client.shutdown(timeout_s=30).success
    assert served.process.wait(30) == 0
    deadline = time.monotonic() + 5
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not directory.exists()


def _bad_model(tmp_path: Path, config: str | None) -> Path:
    """A directory that is not a loadable checkpoint: `config` is its config.json (None:
    no config.json at all)."""
    model = tmp_path / "model"
    model.mkdir()
    if config is not None:
        (model / "config.json").write_text(config)
    return model


BAD_SERVE = {
    "missing model": (
        lambda t: ["--model", "/nonexistent"],
        "--model /nonexistent: no such directory",
    ),
    "model is a file": (
        lambda t: ["--model", str(_touch(t / "file"))],
        "--model {t}/file: not a directory",
    ),
    "no config.json": (
        lambda t: ["--model", str(_bad_model(t, None))],
        "--model {t}/model: no config.json (not a Hugging Face checkpoint)",
    ),
    "config.json not json": (
        lambda t: ["--model", str(_bad_model(t, "{oops"))],
        "--model {t}/model: Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)",
    ),
    "bad dtype": (
        lambda t: ["--model", str(_bad_model(t, "{}")), "--dtype", "float7"],
        "--dtype 'float7': supported ['bfloat16', 'float16', 'float32']",
    ),
    "disk root missing": (
        lambda t: ["--model", str(_bad_model(t, "{}")), "--disk-root", "/nonexistent"],
        "--disk-root /nonexistent: not a directory",
    ),
    "bad device": (
        lambda t: ["--model", str(_bad_model(t, "{}")), "--device", "blah"],
        "--device 'blah': not a torch device (cpu, cuda, cuda:N)",
    ),
    "kv tokens 0": (
        lambda t: ["--model", str(_bad_model(t, "{}")), "--kv-tokens", "0"],
        "kv_tokens: must be > 0, got 0",
    ),
}


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


@pytest.mark.parametrize("args, line", BAD_SERVE.values(), ids=BAD_SERVE.keys())
def test_serve_with_a_bad_input_prints_one_error_line_and_exits_2(tmp_path, args, line):
    """Before: a Python traceback and exit 1 (missing model, missing or broken config.json),
    or a model loaded for nothing (a bad --disk-root)."""
    start = time.monotonic()
    run = cli("serve", *args(tmp_path), timeout=60)
    assert (run.returncode, run.stderr) == (2, f"error: {line.format(t=tmp_path)}\n")
    assert run.stdout == ""
    assert time.monotonic() - start < 30  # no engine started, nothing waited for
