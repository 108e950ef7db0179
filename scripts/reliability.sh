#!/usr/bin/env bash
# The opt-in reliability run: every test in tests/reliability, the long ones included (a
# 12,000-frame live fuzz, soaks of 5,000 and 2,000 requests under 100 and 50 pushes, every
# pusher-stall case), then a summary of the figures they measured. < 10 min on 2 cores.
# Then the freeze schedule (issue 19): every freeze case (an engine, a pusher, a trainer
# rank SIGSTOPped mid-push and SIGCONTed before or after the timeout, for every transport x
# load mode x commit, one engine and two, our engine and vLLM), busy engines, recovery after
# a SIGKILLed pusher, and the two-engine freeze figures (freeze_figures). ~15-20 min more on
# 2 cores; RLSYNC_NO_FREEZE=1 skips it.
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
freeze=(
  tests/reliability/test_faults_freeze.py
  tests/reliability/test_faults_freeze_vllm.py
  tests/reliability/test_faults_slow.py
)
start=$(date +%s)
status=0
python -m pytest tests/reliability -m "slow or not slow" -p no:cacheprovider -q -rxXs \
  --durations=10 "${freeze[@]/#/--ignore=}" "$@" || status=$?
echo
echo "== reliability figures ($(( $(date +%s) - start )) s, pytest exit $status) =="
python -m tests.reliability.summarize "$figures"

if [ "${RLSYNC_NO_FREEZE:-}" != 1 ]; then
  start=$(date +%s)
  freeze_status=0
  echo
  echo "== freeze schedule: ${freeze[*]} =="
  python -m pytest "${freeze[@]}" -m "slow or not slow" -p no:cacheprovider -q -rfxXs \
    --durations=10 "$@" || freeze_status=$?
  echo
  echo "== freeze figures: two engines, one frozen across a push (timeout_s 5) =="
  python -m tests.reliability.freeze_figures --timeout-s 5 || freeze_status=$?
  echo "== freeze schedule: $(( $(date +%s) - start )) s, exit $freeze_status =="
  [ "$freeze_status" = 0 ] || status=$freeze_status
fi
exit "$status"
