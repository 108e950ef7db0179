#!/usr/bin/env bash
# The opt-in reliability run: every test in tests/reliability, the long ones included (a
# 12,000-frame live fuzz, soaks of 5,000 and 2,000 requests under 100 and 50 pushes, every
# pusher-stall case), then a summary of the figures they measured. < 10 min on 2 cores.
#
#   scripts/reliability.sh [extra pytest args]
#
# Figures go to $RLSYNC_FIGURES (default runs/reliability/figures.jsonl, rewritten each run);
# docs/RELIABILITY.md quotes the last run. CI runs the short part: pytest tests/reliability.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
figures="${RLSYNC_FIGURES:-$root/runs/reliability/figures.jsonl}"
mkdir -p "$(dirname "$figures")"
: > "$figures"
export RLSYNC_FIGURES="$figures"
start=$(date +%s)
status=0
python -m pytest tests/reliability -m "slow or not slow" -p no:cacheprovider -q -rxXs \
  --durations=10 "$@" || status=$?
echo
echo "== reliability figures ($(( $(date +%s) - start )) s, pytest exit $status) =="
python -m tests.reliability.summarize "$figures"
exit "$status"
