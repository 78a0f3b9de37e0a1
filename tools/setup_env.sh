#!/usr/bin/env bash
# Create (or reuse) the project-local environment .venv and install everything, MinkowskiEngine included.
# Idempotent: a second run only checks (seconds). Override the torch pins with SPARKME_TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SPARKME_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
log() { echo "[setup_env $(date +%H:%M:%S)] $*"; }

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup_env: error: $PYTHON not found; install Python >= 3.10 (e.g. apt-get install python3 python3-venv)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.sparkme-installed
want="$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing torch ($TORCH_SPEC) and the project's dependencies"
  $PY -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  $PY -m pip install -q $TORCH_SPEC
  $PY -m pip install -q numpy setuptools wheel ninja
  $PY -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
else
  log "python dependencies already installed"
fi
log "MinkowskiEngine"
.venv/bin/sparkme-install-minkowski --jobs "${MAX_JOBS:-$(nproc)}"
$PY -c "import MinkowskiEngine, sparkme; print('environment ready: sparkme', sparkme.__version__, '| backends:', sparkme.available_backends())"
