"""Session fixtures of the reliability tests: one tiny checkpoint and two engine processes
shared by every test that leaves them healthy (tests that kill or starve an engine start
their own). Engines start in parallel: on a loaded 2-core machine each costs seconds."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from infer_side.process.client import EngineClient, launch_engine
from rlsync.model_config import ModelConfig
from tests.reliability.model import make_checkpoint

KV_TOKENS = 512


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The in-process reference engines run on one thread: on a shared 2-core machine,
    torch's intra-op pool makes tiny matmuls ~50x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("reliability") / "model", seed=3)


@pytest.fixture(scope="session")
def cfg(ckpt: Path) -> ModelConfig:
    return ModelConfig.from_dir(ckpt)


def launch_many(ckpt: Path, n: int, **kw: object) -> list[EngineClient]:
    """`n` engines started concurrently (kv_tokens=KV_TOKENS, one torch thread each)."""
    kw = {"kv_tokens": KV_TOKENS, "threads": 1, **kw}
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(launch_engine, ckpt, **kw) for _ in range(n)]
        return [f.result() for f in futures]


@pytest.fixture(scope="session")
def engines(ckpt: Path) -> Iterator[dict[str, EngineClient]]:
    clients = launch_many(ckpt, 2)
    yield {f"e{i}": c for i, c in enumerate(clients)}
    for c in clients:
        c.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port we hold bound but never listen on: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def next_version(clients: dict[str, EngineClient] | list[EngineClient]) -> int:
    items = clients.values() if isinstance(clients, dict) else clients
    return max(c.info().weight_version for c in items) + 1
