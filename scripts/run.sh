#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the main job: the colocated RL loop on its default config.
# Extra args go to `rlsync run` (e.g. --set steps=5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec rlsync run configs/colocated_cpu.yaml "$@"
