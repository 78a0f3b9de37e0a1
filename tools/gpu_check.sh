#!/usr/bin/env bash
# One-shot GPU verification for a machine with an NVIDIA GPU and no network (e.g. an H200 with torch+cu130,
# torchvision and timm preinstalled). Everything else must travel with the checkout:
#   wheels/                      pip wheels of the remaining dependencies (tools/gpu_check.sh --download-wheels makes it)
#   .cache/minkowski/sdist/      the MinkowskiEngine 0.5.4 sdist (or a prebuilt CUDA wheel under .cache/minkowski/<key>/)
# It builds/installs MinkowskiEngine for the local torch, runs the equivalence and training-step tests on CUDA for
# all three backends, runs sparkme-bench (resnet50, convnext_tiny; ratios 0.6/0.75/0.9; batch 64) and writes all
# results under $OUT (default ./gpu_results).
#
#   bash tools/gpu_check.sh              # on the GPU machine
#   bash tools/gpu_check.sh --dry-run    # rehearsal on a CPU machine: every step, CUDA parts skipped or on CPU
#   bash tools/gpu_check.sh --download-wheels   # on a networked machine: fill wheels/ for the offline run
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
step() { local name=$1; shift; log "BEGIN $name"; "$@" > "$OUT/$name.log" 2>&1; local rc=$?;
         log "END $name rc=$rc"; echo "$name $rc" >> "$OUT/status.txt"; return 0; }

if [ "$MODE" = "--download-wheels" ]; then
  mkdir -p wheels
  $PY -m pip download -d wheels hydra-core omegaconf wandb scikit-image tqdm matplotlib pytest hypothesis \
    antlr4-python3-runtime ninja
  exit $?
fi
: > "$OUT/status.txt"
# A carried .cache/ (sdist or prebuilt wheel) serves the offline GPU machine; otherwise the usual ~/.cache/sparkme.
if [ -z "${SPARKME_CACHE:-}" ] && [ -d .cache/minkowski ]; then export SPARKME_CACHE=$PWD/.cache; fi
if [ "$MODE" = "--dry-run" ]; then
  log "dry run: CUDA build replaced by the CPU build, tests and benchmark on the CPU, tiny sizes"
  DEVICE=cpu
  ME_ARGS=(--device cpu)
  BENCH=(--models resnet18 --ratios 0.6,0.9 --batch-sizes 2 --image-size 64 --repeats 1 --warmup 0)
  TESTS=(tests/test_encoders.py -k "float64 and resnet18")
else
  DEVICE=cuda
  ME_ARGS=(--device cuda --cuda-arch "${TORCH_CUDA_ARCH_LIST:-9.0}")
  BENCH=(--models resnet50,convnext_tiny --ratios 0.6,0.75,0.9 --batch-sizes 64 --repeats 5 --warmup 2)
  TESTS=(tests/test_encoders.py tests/test_sparse_map.py)
fi
log "python $($PY -c 'import torch,sys; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())')"
if [ -d wheels ]; then
  step deps $PY -m pip install --no-index --find-links wheels -e . --no-deps
  step deps_extra $PY -m pip install --no-index --find-links wheels hydra-core wandb scikit-image tqdm matplotlib pytest hypothesis
fi
step minkowski_build $PY tools/install_minkowski.py "${ME_ARGS[@]}" --jobs "$(nproc)"
step backends $PY -c "import sparkme; print(sparkme.available_backends())"
export SPARKME_TEST_DEVICE=$DEVICE
step equivalence_tests $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step train_step $PY -m sparkme.cli debug=fast "trainer.device=$DEVICE" "run_dir=$OUT/train_step" backend=minkowski
step bench $PY tools/bench.py "${BENCH[@]}" --device "$DEVICE" --train-step --out "$OUT/bench"
log "summary:"; cat "$OUT/status.txt" | tee -a "$OUT/gpu_check.log"
! grep -qv ' 0$' "$OUT/status.txt"
