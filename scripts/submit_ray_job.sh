#!/usr/bin/env bash
# Submit the RL run as a Ray job. Thin wrapper over `rlsync submit`.
#   scripts/submit_ray_job.sh CONFIG --address http://HEAD:8265 [--set k=v ...]
#        a running cluster (its job API: the dashboard port); add --auth-token-file FILE
#        when the cluster uses token auth. See docs/RAY_CLUSTER.md.
#   scripts/submit_ray_job.sh CONFIG --local [--set k=v ...]
#        start a throwaway local head (127.0.0.1, files under runs/<name>/cluster), submit,
#        follow the logs, then stop that head (and only it).
# With no --address, --local is assumed. The run's metrics land in runs/<name>/ as usual.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG (--address URL | --local) [--set key=value ...]" >&2
  exit 2
fi
config="$1"; shift
case " $* " in
  *" --address "*|*" --address="*|*" --local "*) ;;
  *) set -- --local "$@" ;;
esac
[ -x "$root/.venv/bin/rlsync" ] && export PATH="$root/.venv/bin:$PATH"
cd "$root"
exec rlsync submit "$config" "$@"
