#!/usr/bin/env bash
# Create (or reuse) the project-local environment .venv and install everything, MinkowskiEngine included.
# Idempotent: a second run only checks (seconds). Override the torch pins with SPARKME_TORCH_SPEC.
# Prints one line per step; the full output of pip and of the MinkowskiEngine build goes to .venv/setup.log
# (its last lines are printed if a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SPARKME_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
LOG=.venv/setup.log
log() { echo "[setup_env $(date +%H:%M:%S)] $*"; }
# run a step with its output in $LOG; on failure show the end of it and stop
quietly() {
  echo "+ $*" >> "$LOG"
  if ! "$@" >> "$LOG" 2>&1; then
    echo "setup_env: error: '$*' failed; the end of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup_env: error: $PYTHON not found; install Python >= 3.10 (e.g. apt-get install python3 python3-venv)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
: > "$LOG"
PY=.venv/bin/python
stamp=.venv/.sparkme-installed
want="$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing torch ($TORCH_SPEC), then sparkme and its dependencies (pip install -e .[dev]); log: $LOG"
  quietly $PY -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  quietly $PY -m pip install -q $TORCH_SPEC
  quietly $PY -m pip install -q numpy setuptools wheel ninja
  quietly $PY -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
else
  log "python dependencies already installed (.venv)"
fi
log "MinkowskiEngine: cached wheel, or a build for this torch (about 4 minutes on 2 cores, once); log: $LOG"
quietly .venv/bin/sparkme-install-minkowski --jobs "${MAX_JOBS:-$(nproc)}"
log "$(tail -n 1 "$LOG" | sed 's/^\[install_minkowski [0-9:]*\] //')"
# (-W: a CPU build says at import that it is one; the line below says which backends run)
$PY -W "ignore:The MinkowskiEngine was compiled with CPU_ONLY" -c "import MinkowskiEngine, sparkme; print('environment ready: sparkme', sparkme.__version__, '| backends:', sparkme.available_backends())"
