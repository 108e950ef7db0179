"""Sustained load on two engines while versions land: no request lost or hung, every output
names a version that was pushed, every output produced by one version equals a fresh engine
at that version (greedy and seeded sampling), and engine memory stays flat after warm-up.

Updates use load_mode "in_place" with pause_mode "in_place": the engines pause between steps
while a version is written, keep every request's KV, and resume on the new version. It is
the harshest mode for correctness (a request can span versions, and new requests meet
"weights incomplete" during the write and are retried); the opt-in run adds pause_mode None
with shadow loads (wait for idle, swap between steps: no spanning, no refusals).
"""

from __future__ import annotations

import time

import pytest

from rlsync.config import SyncConfig
from tests.reliability.figures import record
from tests.reliability.soak_driver import run_soak, verify

IN_PLACE = SyncConfig(
    transport="ipc", load_mode="in_place", pause_mode="in_place", bucket_mb=0.02, timeout_s=30
)
WAIT_IDLE = SyncConfig(
    transport="ipc", load_mode="shadow", pause_mode=None, bucket_mb=0.02, timeout_s=30
)


def soak(engines, ckpt, cfg, tmp_path, *, requests, pushes, sync, threads, batch, name) -> dict:
    start = time.monotonic()
    run = run_soak(
        engines,
        ckpt,
        tmp_path,
        requests=requests,
        pushes=pushes,
        sync=sync,
        threads=threads,
        batch=batch,
        bound_s=120,
    )
    seconds = time.monotonic() - start
    assert run.errors == []
    assert len(run.done) == requests  # none lost: every request has its final output
    checked = verify(run, cfg, ckpt)
    assert checked["mismatched"] == 0
    rss = {n: _rss_figures(samples) for n, samples in run.rss_kb.items()}
    figures = {
        "requests": requests,
        "pushes": len(run.pushed),
        "concurrency": threads * batch,
        "refused_then_retried": run.refused,
        "lost": requests - len(run.done),
        "seconds": round(seconds, 1),
        "max_push_s": round(max(run.push_seconds), 2),
        "pause_mode": sync.pause_mode,
        "load_mode": sync.load_mode,
        **checked,
        "rss": rss,
    }
    record(name, **figures)
    return figures


def _rss_figures(samples: list[int]) -> dict:
    """Start (after the first push), after warm-up (a quarter in), end, and peak, in MB."""
    mb = [s / 1024 for s in samples]
    warm = mb[len(mb) // 4]
    return {
        "start_mb": round(mb[0], 1),
        "warm_mb": round(warm, 1),
        "end_mb": round(mb[-1], 1),
        "peak_mb": round(max(mb), 1),
        "growth_after_warmup_mb": round(mb[-1] - warm, 1),
    }


def test_soak_short(engines, ckpt, cfg, tmp_path):
    figures = soak(
        engines,
        ckpt,
        cfg,
        tmp_path,
        requests=60,
        pushes=5,
        sync=IN_PLACE,
        threads=3,
        batch=4,
        name="soak_ci",
    )
    for rss in figures["rss"].values():
        assert rss["growth_after_warmup_mb"] < 40


@pytest.mark.slow
@pytest.mark.parametrize(
    "sync, requests, pushes",
    [(IN_PLACE, 5000, 100), (WAIT_IDLE, 2000, 50)],
    ids=["pause-in_place", "pause-none-shadow"],
)
def test_soak_long(engines, ckpt, cfg, tmp_path, sync, requests, pushes):
    figures = soak(
        engines,
        ckpt,
        cfg,
        tmp_path,
        requests=requests,
        pushes=pushes,
        sync=sync,
        threads=10,
        batch=20,
        name=f"soak_long_{sync.pause_mode}",
    )
    for rss in figures["rss"].values():
        assert rss["growth_after_warmup_mb"] < max(20.0, 0.1 * rss["warm_mb"])
    if sync.pause_mode is None:
        assert figures["spanning"] == 0 and figures["refused_then_retried"] == 0
