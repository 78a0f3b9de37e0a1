#!/usr/bin/env bash
# The 3D CPU demo (experiment=spark3d_demo): writes generated volumes and nibabel's bundled NIfTI files into
# demo_volumes/, then pretrains a small residual encoder on them for a few CPU minutes. Extra arguments are hydra
# overrides (e.g. trainer.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python -m sparkme.data.volumes_demo demo_volumes > /dev/null
.venv/bin/sparkme-pretrain experiment=spark3d_demo data.root=demo_volumes "$@"
