#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the whole CPU test suite. Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec python -m pytest -m "not gpu and not slow" "$@"
