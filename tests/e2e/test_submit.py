"""`rlsync submit` against a real Ray cluster: a throwaway head on 127.0.0.1 (its files and
auth token under the test's temp dir), a 2-step run submitted as a Ray job, the job must
succeed and write its metrics; the head, and only it, is stopped afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlsync.app.metrics import STEP_KEYS, read_metrics
from rlsync.cli.submit import LocalHead

CLI = [sys.executable, "-m", "rlsync.cli"]
TINY = [
    "model.vocab_size=32",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "engine.kv_tokens=1024",
    "task.prompts_per_step=4",
    "task.group_size=4",
    "task.max_new_tokens=4",
]


def test_submit_to_local_head(tmp_path: Path) -> None:
    head = LocalHead(tmp_path / "cluster", num_cpus=4).start()
    marker = str(head.link_dir)  # every process of this head carries its temp dir
    try:
        env = {
            **os.environ,
            **head.client_env(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        sets = [a for kv in ["name=job", "steps=2", *TINY] for a in ("--set", kv)]
        proc = subprocess.run(
            [
                *CLI,
                "submit",
                "configs/colocated_cpu.yaml",
                "--address",
                head.dashboard_url,
                "--run-dir",
                str(tmp_path / "runs"),
                "--timeout",
                "240",
                *sets,
            ],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        head.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SUCCEEDED" in out
    rows = read_metrics(tmp_path / "runs" / "job" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(set(STEP_KEYS) <= set(r) for r in rows)
    assert [r["weight_version"] for r in rows] == [0, 1]
    assert (tmp_path / "runs" / "job" / "final" / "config.json").is_file()
    assert not _processes_mentioning(marker)  # the head is gone


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (the head's processes carry its temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids
