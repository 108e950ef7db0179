#!/usr/bin/env bash
# Generation benchmark: tokens/s of our engine (in-process core and server process) next to
# Hugging Face `generate` at batch 1, 8 and 32 on one small checkpoint, in one run. Thin wrapper
# over `rlsync bench generate`; extra args go through (e.g. --max-new-tokens 128 --threads 1;
# --engine vllm adds our vLLM backend side by side).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$root/.venv/bin/rlsync" ] && export PATH="$root/.venv/bin:$PATH"
cd "$root"
mkdir -p runs/bench
exec rlsync bench generate --json "runs/bench/generate-$(date +%Y%m%d-%H%M%S).json" "$@"
