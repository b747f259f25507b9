#!/usr/bin/env bash
# Every rmflow check that needs a GPU, in one call: rmflow's loop distributed (torchrun + nccl, or Ray
# Train where installed) with a killed worker resumed, FSDP on one GPU, the MFU table (padded
# batch-of-8 vs bucketed vs packed, 0.5B and 1.5B decoders). One JSON line per check on stdout and
# nothing else; exit status non-zero when any check failed. Under 8 minutes by its own deadline.
#   bench/gpu_check.sh                  all checks
#   bench/gpu_check.sh --only mfu --sizes 1.5b
#   bench/gpu_check.sh --cpu            the same entry points rehearsed on the CPU
#   bench/gpu_check.sh --dry-run        the plan, nothing run
# Python: $RMFLOW_PYTHON, else the project's .venv when there is one, else python3 (a GPU machine's
# own, with torch and transformers). Nothing is downloaded: wheels of what that Python lacks come from
# $RMFLOW_WHEELS (default .whl/, made on a machine with network by bench/gpu_wheels.sh) and are
# installed into a scratch folder, never into that Python's environment. When that Python has not
# installed rmflow, this checkout is put on its path in the layout pyproject.toml gives it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${RMFLOW_PYTHON:-}"
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
WHEELS="${RMFLOW_WHEELS:-.whl}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
fail() {  # a failing JSON row and the final line: what went wrong before Python could report it
  printf '{"check": "%s", "ok": false, "error": "%s"}\n{"gpu_check": "done", "ok": false, "failed": ["%s"]}\n' "$1" "$2" "$1"
  exit 1
}
command -v "$PY" >/dev/null || fail env "no Python at $PY (set RMFLOW_PYTHON)"
# only for a Python that lacks them (the wheels are cp312: the GPU machine's)
if compgen -G "$WHEELS/*.whl" >/dev/null && ! "$PY" -c "import pydantic, datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/wheels" "$WHEELS"/*.whl >&2 \
    || fail env "pip could not install the wheels in $WHEELS (remake them with bench/gpu_wheels.sh)"
fi
# the checkout, never the current folder, on the path: python -m would otherwise find ./rmflow (which has
# no bench/ or infra/) before the layout below
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$SCRATCH/wheels${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import rmflow.bench.gpu_check" 2>/dev/null; then
  mkdir -p "$SCRATCH/src/rmflow"
  ln -s "$PWD"/rmflow/*.py "$SCRATCH/src/rmflow/"
  for d in tasks flows infra bench; do ln -s "$PWD/$d" "$SCRATCH/src/rmflow/$d"; done
  ln -s "$PWD/rmcore" "$SCRATCH/src/rmcore"
  export PYTHONPATH="$SCRATCH/src:$PYTHONPATH"
  "$PY" -c "import rmflow.bench.gpu_check" 2>/dev/null || fail env "$PY cannot import rmflow.bench.gpu_check from this checkout"
fi
"$PY" -m rmflow.bench.gpu_check "$@"
