#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (MinkowskiEngine tests included, never skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@" tests
