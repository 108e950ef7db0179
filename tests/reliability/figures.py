"""Figures the reliability tests measure: printed (`pytest -s` shows them) and, when the
opt-in run sets RLSYNC_FIGURES=<file>, appended there as JSON lines for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(section: str, **values: Any) -> None:
    line = json.dumps({"section": section, **values}, sort_keys=True)
    print(f"FIGURES {line}", flush=True)
    path = os.environ.get("RLSYNC_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
