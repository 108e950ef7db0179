"""Layering: every import points down, folder by folder.

    rlsync.bench                     (above everything; only the CLI imports it)
    rlsync.cli, rlsync.app           (the RL loop and the command line: both sides)
    trainer_side.rl                  infer_side.process, infer_side.actor
    trainer_side.sync                infer_side.engines.{native, vllm} (never each other)
                                     infer_side.engines (what backends share)
                                     infer_side.update (the update order, the engine interface)
    the library core: rlsync.wire, rlsync.plan, rlsync.transports (+ .sharded), rlsync.config ...

The core imports neither side, nor the app, the bench or the CLI, nor the packages only those
need (Ray, YAML, progress bars, plots). The two sides never import each other. Inside a side
each folder imports only folders below it: the pusher knows no PPO, the update machine knows
no backend, a backend no other backend and no process shell. Checked on the source (every
`import`, at any depth, including ones inside functions), and by importing the library and
both sides' core modules with the app's packages made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE = ("rlsync.app", "rlsync.cli", "rlsync.bench")
APP_ONLY = ("ray", "yaml", "tqdm", "matplotlib")
SIDE = ("trainer_side", "infer_side")
SHELLS = ("infer_side.process", "infer_side.actor")
BACKENDS = ("infer_side.engines.native", "infer_side.engines.vllm")
FORBIDDEN = {
    "core": (*SIDE, *ABOVE, *APP_ONLY),
    "trainer_side": ("infer_side", *ABOVE),
    "trainer_side.sync": ("infer_side", "trainer_side.rl", *ABOVE),
    "infer_side": ("trainer_side", *ABOVE),
    "infer_side.process": ("trainer_side", "infer_side.actor", *ABOVE),
    "infer_side.update": ("trainer_side", "infer_side.engines", *SHELLS, *ABOVE),
    "infer_side.engines": ("trainer_side", *BACKENDS, *SHELLS, *ABOVE),
    "infer_side.engines.native": ("trainer_side", "infer_side.engines.vllm", *SHELLS, *ABOVE),
    "infer_side.engines.vllm": ("trainer_side", "infer_side.engines.native", *SHELLS, *ABOVE),
    "rlsync.app": ("rlsync.cli", "rlsync.bench"),
}
"""layer -> module prefixes it must not import. A file's layer is the longest key its module
name starts with; the library core is every `rlsync` module outside app, cli and bench."""
LIGHT_MODULES = [
    "rlsync.wire.protocol",
    "rlsync.wire.codec",
    "rlsync.wire.rpc",
    "rlsync.config",
    "rlsync.plan.buckets",
    "rlsync.transports.broadcast",
    "rlsync.transports.shm",
    "rlsync.transports.disk",
    "trainer_side.sync.pusher",
    "infer_side.engines.native.engine_core",
    "infer_side.process.server",
    "infer_side.process.client",
]
CLI_LIGHT = ["serve", "push", "info", "generate", "flush"]
"""Subcommands that work with the base install (their lazy imports are in LIGHT_MODULES)."""
BLOCKED = ("ray", "yaml", "tqdm", "matplotlib", "numpy")


def layer(path: Path) -> str | None:
    """Which layer a source file belongs to (None: above every rule, or not ours)."""
    name = module_name(path)
    if name.split(".")[0] == "rlsync" and not name.startswith(("rlsync.cli", "rlsync.bench")):
        if not name.startswith("rlsync.app"):
            return "core"
    keys = [k for k in FORBIDDEN if name == k or name.startswith(k + ".")]
    return max(keys, key=len, default=None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*pkg, base] if base else pkg)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def crossings(path: Path, source: str) -> list[str]:
    """Every import in `source` (a file at `path`) that crosses a layer the wrong way."""
    rules = FORBIDDEN.get(layer(path) or "", ())
    tree = ast.parse(source, str(path))
    found = imported(tree, module_name(path), path.name == "__init__.py")
    hits = {
        (line, bad): name
        for line, name in reversed(found)
        for bad in rules
        if name == bad or name.startswith(bad + ".")
    }
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for (line, _), name in sorted(hits.items())
    ]


def sources() -> list[Path]:
    return sorted(
        p for pkg in ("rlsync", "trainer_side", "infer_side") for p in (ROOT / pkg).rglob("*.py")
    )


def test_no_import_crosses_a_layer_the_wrong_way() -> None:
    bad = [line for path in sources() for line in crossings(path, path.read_text())]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("rlsync/wire/codec.py", "import yaml\n"),
        ("rlsync/transports/shm.py", "def f():\n    from rlsync.app import metrics\n"),
        ("rlsync/plan/buckets.py", "from trainer_side.sync.pusher import WeightPusher\n"),
        ("rlsync/config.py", "from .app.run_config import RunConfig\n"),
        ("trainer_side/sync/pusher.py", "import infer_side.engines.native.engine_core\n"),
        ("infer_side/process/server.py", "from trainer_side import policy\n"),
        ("infer_side/actor.py", "from rlsync.app.ray_session import gather\n"),
        ("trainer_side/rl/actor.py", "from rlsync import cli\n"),
        ("rlsync/transports/__init__.py", "from ..bench import report\n"),
        ("trainer_side/sync/pusher.py", "from trainer_side.rl.ppo import ppo_loss\n"),
        ("infer_side/update/update_machine.py", "from infer_side.engines import weights\n"),
        ("infer_side/engines/vllm/vllm_core.py", "from ..native import scheduler\n"),
        ("infer_side/engines/native/engine_core.py", "import infer_side.engines.vllm\n"),
        ("infer_side/engines/core_base.py", "from infer_side.process import server\n"),
        ("rlsync/transports/sharded/ipc.py", "from trainer_side.rl.fsdp import shard_policy\n"),
        ("rlsync/app/launcher.py", "from rlsync.bench import sync\n"),
    ],
)
def test_the_checker_catches_a_violating_import(path: str, source: str) -> None:
    assert crossings(ROOT / path, source)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("rlsync/app/launcher.py", "import ray\nfrom trainer_side.rl.actor import TrainerActor\n"),
        ("trainer_side/rl/actor.py", "import ray\nfrom rlsync.config import SyncConfig\n"),
        ("trainer_side/rl/actor.py", "from trainer_side.sync import WeightPusher\n"),
        (
            "infer_side/engines/vllm/vllm_core.py",
            "from infer_side.engines.request import Request\n",
        ),
        ("infer_side/process/server.py", "from infer_side.engines.native import engine_core\n"),
        ("rlsync/cli/bench.py", "from rlsync.bench import sync\n"),
        (
            "rlsync/wire/codec.py",
            "from rlsync.wire.protocol import Message\nfrom . import protocol\n",
        ),
    ],
)
def test_the_checker_allows_imports_that_point_down(path: str, source: str) -> None:
    assert crossings(ROOT / path, source) == []


BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked by test_layers: {{name}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def import_without_app_packages(modules: list[str], then: str = "") -> subprocess.CompletedProcess:
    code = (
        BLOCKER
        + "".join(f"import {m}\n" for m in modules)
        + then
        + (
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\n"
            "assert not bad, bad\n"
        )
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_library_and_sides_import_without_ray_yaml_tqdm_matplotlib_numpy() -> None:
    proc = import_without_app_packages(LIGHT_MODULES)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_import_check_fails_when_a_module_needs_a_blocked_package() -> None:
    proc = import_without_app_packages(["rlsync.app.run_config"])
    assert proc.returncode != 0 and "blocked by test_layers: yaml" in proc.stderr


@pytest.mark.parametrize("command", CLI_LIGHT)
def test_base_install_subcommands_parse_without_app_packages(command: str) -> None:
    then = (
        f"from rlsync.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n"
        f"    assert e.code == 0, e.code\n"
    )
    proc = import_without_app_packages(
        ["rlsync.checkpoint_io", "trainer_side.sync.push_report"], then
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
