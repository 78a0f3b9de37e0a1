#!/usr/bin/env bash
# Set up the environment if needed, then run the CPU pretraining demo (experiment=demo): resnet18 on the photos
# bundled with scikit-image, torch backend, CPU. Extra arguments are hydra overrides (e.g. backend=minkowski
# trainer.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/sparkme-pretrain experiment=demo "$@"
