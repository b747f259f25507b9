#!/usr/bin/env bash
# Bootstraps rmflow's virtualenv, then runs one of:
#   ./run.sh demo        the end-to-end pipeline on embedded defaults (rmflow demo)
#   ./run.sh test [...]  ruff, then the test suite (extra args go to pytest; -m "not slow" is the quick subset)
#   ./run.sh bench ...   a benchmark (rmflow bench ...)
#   ./run.sh rmflow ...  any rmflow command
# On a machine without CUDA the CPU build of torch is installed first, so pip never pulls the
# multi-GB CUDA wheel. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RMFLOW_VENV:-.venv}"
PY="$(command -v python3.11 || command -v python3)"
cmd="${1:-demo}"; shift || true

# The demo's Label Studio lives in a virtualenv of its own (its pins clash with rmflow's): on a fresh
# machine, install it while rmflow's installs (about a minute saved); `rmflow up` waits for nothing
# then. Where and which version: infra/labelstudio.py (venv_dir, VERSION).
ls_pid=""
if [ "$cmd" = demo ]; then
  ls_venv="${RMFLOW_LABEL_STUDIO_VENV:-${RMFLOW_HOME:-$HOME/.rmflow}/labelstudio/venv}"
  if [ ! -x "$ls_venv/bin/label-studio" ]; then
    ls_version="$(sed -n 's/^VERSION = "\(.*\)"/\1/p' infra/labelstudio.py)"
    mkdir -p "$(dirname "$ls_venv")"
    echo "installing label-studio==$ls_version into $ls_venv alongside rmflow (log: $ls_venv.log)" >&2
    ( "$PY" -m venv "$ls_venv" && "$ls_venv/bin/python" -m pip install -q --upgrade pip \
        && "$ls_venv/bin/python" -m pip install -q "label-studio==$ls_version" ) >"$ls_venv.log" 2>&1 &
    ls_pid=$!
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
stamp="$VENV/.rmflow-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q -e ".[test,bench,team]"
  echo "$want" > "$stamp"
fi

# The browser tests drive Debian's chromium through chromium-driver (never a downloaded driver).
ensure_browser() {
  [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing chromium + chromium-driver (apt-get) for the browser tests" >&2
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "warning: could not install chromium; the browser tests will fail" >&2
}

# The team backends' tests and `rmflow up --team` run Debian's PostgreSQL (infra/postgres.py finds it).
ensure_postgres() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing postgresql (apt-get) for the team-backend tests" >&2
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq postgresql >/dev/null; } \
    || echo "warning: could not install postgresql; the team-backend tests will fail" >&2
}

# a failed background install is finished by `rmflow up` (infra/labelstudio.py ensure_installed)
if [ -n "$ls_pid" ]; then wait "$ls_pid" || echo "label-studio install failed (see $ls_venv.log); rmflow up retries it" >&2; fi
case "$cmd" in
  demo)   exec "$VENV/bin/rmflow" demo "$@" ;;
  test)   ensure_browser; ensure_postgres; "$VENV/bin/ruff" check . && exec "$VENV/bin/python" -m pytest -q "$@" ;;
  bench)  exec "$VENV/bin/rmflow" bench "$@" ;;
  rmflow) exec "$VENV/bin/rmflow" "$@" ;;
  *) echo "usage: ./run.sh demo|test|bench|rmflow [args]" >&2; exit 2 ;;
esac
