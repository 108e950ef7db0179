"""An AST scan for code that can run code while reading data: pickle and its relatives,
torch.load, numpy.load(allow_pickle=True), unsafe YAML loaders, pyzmq's *_pyobj, eval/exec.

Imports are resolved through their aliases (`import pickle as p; p.loads(x)`, `from torch
import load`), so a renamed call is still found. `scan_source` returns one line per finding.
"""

from __future__ import annotations

import ast
from pathlib import Path

BANNED_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "marshal",
    "shelve",
    "joblib",
    "pickletools",
    "copyreg",
}
BANNED_CALLS = {
    "torch.load",
    "torch.jit.load",
    "torch.serialization.load",
    "pandas.read_pickle",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "yaml.unsafe_load_all",
    "eval",
    "exec",
    "builtins.eval",
    "builtins.exec",
    "numpy.lib.format.read_array",
}
BANNED_METHODS = {"recv_pyobj", "send_pyobj", "recv_serialized", "loads_pickle"}
"""Attribute calls on any object (pyzmq sockets unpickle in recv_pyobj)."""
PICKLE_FLAG_CALLS = {"numpy.load", "numpy.lib.npyio.load"}
"""Allowed only without a truthy allow_pickle= keyword."""


def scan_file(path: Path) -> list[str]:
    return [f"{path}:{line}" for line in scan_source(path.read_text(), str(path))]


def scan_source(source: str, name: str = "<source>") -> list[str]:
    tree = ast.parse(source, name)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        problem = _check(node, aliases)
        if problem:
            found.append(f"{getattr(node, 'lineno', 0)}: {problem}")
    return found


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return _canonical(aliases.get(node.id, node.id))
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def _canonical(name: str) -> str:
    return "numpy" + name[2:] if name == "np" or name.startswith("np.") else name


def _check(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Import):
        bad = [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        return f"import {bad[0]}" if bad else None
    if isinstance(node, ast.ImportFrom):
        if (node.module or "").split(".")[0] in BANNED_MODULES:
            return f"from {node.module} import ..."
        full = {f"{node.module}.{a.name}" for a in node.names}
        bad = full & (BANNED_CALLS | PICKLE_FLAG_CALLS)
        return f"from-import of {sorted(bad)[0]}" if bad & BANNED_CALLS else None
    if isinstance(node, ast.Call):
        return _check_call(node, aliases)
    return None


def _check_call(node: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(node.func, aliases)
    if isinstance(node.func, ast.Attribute) and node.func.attr in BANNED_METHODS:
        return f"call .{node.func.attr}()"
    if name is None:
        return None
    if name in BANNED_CALLS or name.split(".")[0] in BANNED_MODULES:
        return f"call {name}()"
    if name in PICKLE_FLAG_CALLS and _truthy_kw(node, "allow_pickle"):
        return f"call {name}(allow_pickle=...)"
    if name in ("__import__", "importlib.import_module") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in BANNED_MODULES:
            return f"dynamic import of {arg.value}"
    return None


def _truthy_kw(node: ast.Call, key: str) -> bool:
    for kw in node.keywords:
        if kw.arg == key:
            return not (isinstance(kw.value, ast.Constant) and not kw.value.value)
        if kw.arg is None:  # **kwargs could carry it
            return True
    return False
