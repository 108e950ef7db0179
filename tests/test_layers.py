"""Layering: every import points down. library <- trainer_side / infer_side <- app, bench, cli.

The library (`rlsync`'s top-level modules and `rlsync.transports`) imports neither side, the
application, the bench or the CLI, nor the packages only those need (Ray, YAML, progress bars,
plots). The two sides never import each other, nor anything above them. Checked on the source
(every `import`, at any depth, including ones inside functions), and by importing the library
and both sides' core modules with those packages made unimportable.
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
FORBIDDEN = {
    "core": ("trainer_side", "infer_side", *ABOVE, *APP_ONLY),
    "trainer_side": ("infer_side", *ABOVE),
    "infer_side": ("trainer_side", *ABOVE),
}
LIGHT_MODULES = [
    "rlsync.protocol",
    "rlsync.codec",
    "rlsync.rpc",
    "rlsync.config",
    "rlsync.buckets",
    "rlsync.transports.broadcast",
    "rlsync.transports.shm",
    "rlsync.transports.disk",
    "trainer_side.pusher",
    "infer_side.engine_core",
    "infer_side.server",
    "infer_side.client",
]
CLI_LIGHT = ["serve", "push", "info", "generate", "flush"]
"""Subcommands that work with the base install (their lazy imports are in LIGHT_MODULES)."""
BLOCKED = ("ray", "yaml", "tqdm", "matplotlib", "numpy")


def layer(path: Path) -> str | None:
    """Which layer a source file belongs to (None: above every rule, or not ours)."""
    parts = path.relative_to(ROOT).parts
    if parts[0] in ("trainer_side", "infer_side"):
        return parts[0]
    if parts[0] == "rlsync" and (len(parts) == 2 or parts[1] == "transports"):
        return "core"
    return None


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
        ("rlsync/codec.py", "import yaml\n"),
        ("rlsync/transports/shm.py", "def f():\n    from rlsync.app import metrics\n"),
        ("rlsync/buckets.py", "from trainer_side.pusher import WeightPusher\n"),
        ("rlsync/config.py", "from .app.run_config import RunConfig\n"),
        ("trainer_side/pusher.py", "import infer_side.engine_core\n"),
        ("infer_side/server.py", "from trainer_side import policy\n"),
        ("infer_side/actor.py", "from rlsync.app.ray_session import gather\n"),
        ("trainer_side/actor.py", "from rlsync import cli\n"),
        ("rlsync/transports/__init__.py", "from ..bench import report\n"),
    ],
)
def test_the_checker_catches_a_violating_import(path: str, source: str) -> None:
    assert crossings(ROOT / path, source)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("rlsync/app/launcher.py", "import ray\nfrom trainer_side.actor import TrainerActor\n"),
        ("trainer_side/actor.py", "import ray\nfrom rlsync.config import SyncConfig\n"),
        ("rlsync/codec.py", "from rlsync.protocol import Message\nfrom . import protocol\n"),
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
    proc = import_without_app_packages(["rlsync.checkpoint_io", "trainer_side.push_report"], then)
    assert proc.returncode == 0, proc.stderr[-3000:]
