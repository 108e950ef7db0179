"""`rlsync bench sync --trainer-ranks` cannot rot: a tiny run through the CLI entry from 1 and
2 FSDP2-style trainer ranks over ipc and broadcast, both methods, the engine bit-exact after
each, and the memory the gather costs rank 0 (the whole model) next to what the sharded push
costs (no copy), per transport."""

from __future__ import annotations

import json
import math

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
    assert [(r["ranks"], r["transport"], r["method"]) for r in rows] == [
        (w, t, m) for w in (1, 2) for t in ("ipc", "broadcast") for m in ("shards", "gather")
    ]
    for r in rows:
        assert r["error"] == "" and r["verified"] is True, r
        assert all(math.isfinite(s) and s > 0 for s in r["seconds"]) and len(r["seconds"]) == 1
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
    model_mib = rows[0]["bytes"] / 2**20
    for t in ("ipc", "broadcast"):
        shards, gather = (next(r for r in rows[4:] if (r["transport"], r["method"]) == (t, m))
                          for m in ("shards", "gather"))  # fmt: skip
        assert gather["rank0_peak_mib"] > 0.8 * model_mib, t  # rank 0 held every full tensor
        assert shards["rank0_peak_mib"] < 0.25 * model_mib, t  # rank 0 sent its rows, no copy
        assert shards["other_peak_mib"] < 0.25 * model_mib, t
