#!/usr/bin/env bash
# Create or reuse the project venv (.venv) and install rlsync into it, with test extras.
# Where no NVIDIA GPU is present torch is pinned to the CPU build through a constraints file,
# so pip never pulls a multi-GB CUDA wheel. Then installs vLLM (scripts/install_vllm.sh; set
# RLSYNC_NO_VLLM=1 to skip it). Re-installs only when pyproject, constraints or install_vllm.sh change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RLSYNC_VENV:-$root/.venv}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  constraints="$root/constraints/gpu.txt"
else
  constraints="$root/constraints/cpu.txt"
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.rlsync-installed"
hashed=("$root/pyproject.toml" "$constraints")
[ "${RLSYNC_NO_VLLM:-}" = 1 ] || hashed+=("$root/scripts/install_vllm.sh")
want="$(cat "${hashed[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$constraints" "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -c "$constraints" -e "$root[test]"
  if [ "${RLSYNC_NO_VLLM:-}" != 1 ]; then
    "$root/scripts/install_vllm.sh" "$venv/bin/python" "$constraints"
  fi
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
