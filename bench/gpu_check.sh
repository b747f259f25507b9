#!/usr/bin/env bash
# Every rmflow check that needs a GPU, in one call: nccl training through Ray Train with a killed
# worker resumed, the MFU table (padded batch-of-8 vs bucketed vs packed, 0.5B and 1.5B decoders),
# FSDP on one GPU. One JSON line per check; exit status non-zero when any check failed.
#   bench/gpu_check.sh                  all checks (under 8 minutes on one H100)
#   bench/gpu_check.sh --only mfu --sizes 1.5b
#   bench/gpu_check.sh --dry-run        the plan, nothing run
# Python: $RMFLOW_PYTHON if set (an environment that already has rmflow's dependencies), else the
# project's .venv, created by ./run.sh's own set-up when missing (CUDA build of torch on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${RMFLOW_PYTHON:-}"
if [ -z "$PY" ]; then
  [ -x .venv/bin/rmflow ] || ./run.sh rmflow --help >/dev/null
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
exec "$PY" -m rmflow.bench.gpu_check "$@"
