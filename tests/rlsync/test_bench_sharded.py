"""`rlsync bench sync --trainer-ranks` cannot rot: a tiny run through the CLI entry from 1 and
2 FSDP2-style trainer ranks, both methods, the engine bit-exact after each, and the memory
the gather costs rank 0 (the whole model) next to what the sharded push costs (no copy)."""

from __future__ import annotations

import json

import pytest

from rlsync.cli import main

pytestmark = pytest.mark.timeout(300)


def test_sharded_bench_rows_and_memory(tmp_path):
    rc = main(
        ["bench", "sync", "--trainer-ranks", "1", "2", "--size-gib", "0.01", "--layers", "2",
         "--repeat", "1", "--timeout", "60", "--work-dir", str(tmp_path),
         "--json", str(tmp_path / "sharded.json")]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads((tmp_path / "sharded.json").read_text())["rows"]
    assert [(r["ranks"], r["method"]) for r in rows] == [
        (1, "shards"), (1, "gather"), (2, "shards"), (2, "gather")
    ]  # fmt: skip
    for r in rows:
        assert r["error"] == "" and r["verified"] is True
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
    model_mib = rows[0]["bytes"] / 2**20
    shards, gather = rows[2], rows[3]
    assert gather["rank0_peak_mib"] > 0.8 * model_mib  # rank 0 held every full tensor
    assert shards["rank0_peak_mib"] < 0.25 * model_mib  # rank 0 wrote its rows, copied nothing
    assert shards["other_peak_mib"] < 0.25 * model_mib
