#!/usr/bin/env bash
# Weight-sync benchmark: our transports (broadcast, ipc, disk; in_place and shadow) against the
# baselines (per-tensor broadcast, Ray object store, safetensors round trip, pickle over ZMQ) and
# the machine's limits (memcpy, one raw broadcast), on the same weights. Thin wrapper over
# `rlsync bench sync`; extra args go through. Results land in runs/bench/ unless overridden.
#   scripts/bench_sync.sh                             # 0.25 and 1 GiB, 1 and 2 engines
#   scripts/bench_sync.sh --size-gib 0.25 --engines 1 --repeat 5
#   scripts/bench_sync.sh --gpu                       # add the GPU section (CUDA IPC, empty_cache)
#   scripts/bench_sync.sh --engine vllm --size-gib 0.03  # push into the vLLM backend vs vLLM's own paths
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/rlsync" ] && export PATH="$root/.venv/bin:$PATH"
cd "$root"
mkdir -p runs/bench
stamp="$(date +%Y%m%d-%H%M%S)"
exec rlsync bench sync --json "runs/bench/sync-$stamp.json" --plot "runs/bench/sync-$stamp.png" "$@"
