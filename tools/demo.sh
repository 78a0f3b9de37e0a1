#!/usr/bin/env bash
# Set up the environment if needed, then run the default pretraining demo: resnet18 on the photos bundled with
# scikit-image, minkowski backend, CPU. Extra arguments are hydra overrides (e.g. backend=torch trainer.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/sparkme-pretrain "$@"
