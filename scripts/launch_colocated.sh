#!/usr/bin/env bash
# The colocated RL loop on this machine: trainer and engine(s) as Ray actors in one placement
# group, weights through shared memory (CUDA IPC on a GPU). A private Ray is started inside
# runs/<name>/ray and stopped at the end. Thin wrapper over `rlsync run`.
#   scripts/launch_colocated.sh                         # configs/colocated_cpu.yaml
#   scripts/launch_colocated.sh my.yaml --set steps=50  # another config, overrides
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="$root/configs/colocated_cpu.yaml"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then config="$1"; shift; fi
[ -x "$root/.venv/bin/rlsync" ] && export PATH="$root/.venv/bin:$PATH"
cd "$root"
exec rlsync run "$config" --set placement=colocated "$@"
