"""`rlsync bench commit` cannot rot: a tiny run through the CLI entry (2 engines, ipc, both
commit modes), every row present, bit-exact, with skews that agree with each other."""

from __future__ import annotations

import json

import pytest

from rlsync.bench.commit import CommitBench
from rlsync.cli import main

pytestmark = pytest.mark.timeout(180)


def test_bench_commit_rows(tmp_path, capsys):
    rc = main(
        [
            "bench",
            "commit",
            "--engines",
            "2",
            "--transports",
            "ipc",
            "--repeat",
            "3",
            "--size-gib",
            "0.002",
            "--layers",
            "2",
            "--work-dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "commit.json"),
        ]
    )
    assert rc == 0
    assert [p.name for p in tmp_path.iterdir()] == ["commit.json"]  # scratch removed
    rows = json.loads((tmp_path / "commit.json").read_text())["rows"]
    assert [(r["engines"], r["transport"], r["commit"]) for r in rows] == [
        (2, "ipc", "independent"),
        (2, "ipc", "atomic"),
    ]
    for r in rows:
        assert r["verified"] is True and r["push_s_median"] > 0
        assert 0 <= r["skew_ms_median"] <= r["skew_ms_p90"] <= r["skew_ms_max"]
    assert "| 2 | ipc | atomic |" in capsys.readouterr().out


def test_bench_commit_needs_two_engines():
    with pytest.raises(ValueError, match="engine counts >= 2"):
        CommitBench(engines=[1])
