"""Summarise the figures an opt-in reliability run wrote (one JSON object per line):

python -m tests.reliability.summarize runs/reliability/figures.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(lines: list[str]) -> str:
    rows = [json.loads(line) for line in lines if line.strip()]
    by_section: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_section[row.pop("section")].append(row)
    out = []
    for section, items in by_section.items():
        for item in items:
            fields = ", ".join(f"{k}={_short(v)}" for k, v in sorted(item.items()))
            out.append(f"{section}: {fields}")
    faults = sum(len(v) for k, v in by_section.items() if k.startswith("fault_"))
    fuzzed = sum(r["frames_sent"] for r in by_section.get("live_fuzz", []))
    lost = sum(r.get("lost", 0) for v in by_section.values() for r in v)
    out.append(
        f"TOTAL: frames fuzzed live={fuzzed}, faults injected and survived={faults}, "
        f"requests lost={lost}"
    )
    return "\n".join(out)


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 400 else text[:400] + "..."


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0]) as f:
        print(summarize(f.readlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
