"""The tree stays `ruff format`-ed and `ruff check`-clean (pyproject's [tool.ruff])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.skip("ruff is not installed (it comes with the test extra)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_tree_is_ruff_formatted():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout[-2000:]


def test_tree_is_ruff_clean():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout[-2000:]
