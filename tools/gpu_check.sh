#!/usr/bin/env bash
# One-shot GPU verification for a machine with an NVIDIA GPU and no network, e.g. an H200 whose python3 already has
# torch (+cu130), torchvision, timm, numpy, scikit-image, pytest, hypothesis, ninja and nvcc. What it lacks travels
# with the checkout, prepared on a networked machine by `bash tools/gpu_check.sh --prepare`:
#   wheels/                     pure-Python wheels: hydra-core, omegaconf, antlr4-python3-runtime (missing there)
#                               and timm pinned to the version CI tests
#   .cache/minkowski/sdist/     the MinkowskiEngine 0.5.4 sdist, built there for that machine's torch
# It installs the wheels into a private folder on PYTHONPATH (the machine's own packages stay untouched), builds and
# installs MinkowskiEngine for the local torch, runs the equivalence tests on CUDA for all three backends, a
# training step, and sparkme-bench (resnet50, convnext_tiny; ratios 0.6/0.75/0.9; batch 64; then ResEnc-L volumes
# at 128^3, masks 0.75/0.9, batch 2). Each step has a time
# limit and all share one budget (GPU_CHECK_BUDGET, 560 s), so the check ends in time even when a step hangs.
# Results go to $RESULTS (default ./gpu_results): gpu_check.log, status.txt, one log per step, bench/*. When $OUT is
# set (the device tool's folder that comes back, at most 8 files), it receives gpu_results.tar.gz (everything but
# checkpoints) and the summaries.
#
#   bash tools/gpu_check.sh --prepare    # networked machine: fill wheels/ and .cache/ for the offline run
#   bash tools/gpu_check.sh --dry-run    # rehearsal on a CPU machine: every step, CUDA parts on the CPU, tiny sizes
#   bash tools/gpu_check.sh              # on the GPU machine (carry wheels/ and .cache/)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
RESULTS=${RESULTS:-$PWD/gpu_results}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
# Versions CI tests with (timm too, so the GPU run checks the same model code); all pure Python, so one wheel
# serves any CPython 3.
CARRIED=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 timm==1.0.31
         dynamic-network-architectures==0.4.2 einops==0.8.2)  # the last two: the 3-D ResEnc benchmark

if [ "$MODE" = "--prepare" ]; then
  set -e
  mkdir -p wheels && rm -f wheels/*.whl  # one version of each package: pip --target refuses two
  # antlr4-python3-runtime 4.9.3 is published as an sdist only: build its (pure-Python) wheel here.
  $PY -m pip wheel --no-deps -q -w wheels "${CARRIED[@]}"
  $PY tools/install_minkowski.py --fetch-sdist --cache-dir .cache
  ls -la wheels .cache/minkowski/sdist
  exit 0
fi
case "$MODE" in run|--dry-run) ;; *) echo "usage: $0 [--prepare|--dry-run]" >&2; exit 2 ;; esac

rm -rf "$RESULTS"; mkdir -p "$RESULTS"
: > "$RESULTS/status.txt"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$RESULTS/gpu_check.log"; }
# The device tool stops a command at 600 s: every step ends before this budget, so the results are always packed.
BUDGET=${GPU_CHECK_BUDGET:-560}
# step NAME SECONDS CMD...: run CMD with a time limit (its own, or what is left of the budget if less), its output in
# NAME.log, its exit code in status.txt (124: timed out)
step() { local name=$1 limit=$2; shift 2; local left=$((BUDGET - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
         if [ "$limit" -le 0 ]; then log "SKIP $name: budget spent"; echo "$name skipped" >> "$RESULTS/status.txt"; return; fi
         log "BEGIN $name (limit $limit s)"; local t0=$SECONDS
         timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1; local rc=$?
         log "END $name rc=$rc ($((SECONDS - t0)) s)"; echo "$name $rc" >> "$RESULTS/status.txt"; }
pack() {  # what comes back from the device machine: one archive plus the files worth reading first
  [ -n "${OUT:-}" ] && [ "$OUT" != "$RESULTS" ] || return 0
  mkdir -p "$OUT"
  tar czf "$OUT/gpu_results.tar.gz" --exclude='*.pt' -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  cp "$RESULTS/gpu_check.log" "$RESULTS/status.txt" "$OUT/" 2>/dev/null
  cp "$RESULTS/bench/results.csv" "$OUT/bench_results.csv" 2>/dev/null
  cp "$RESULTS/bench.log" "$OUT/bench.log" 2>/dev/null
  cp "$RESULTS/bench3d/results.csv" "$OUT/bench3d_results.csv" 2>/dev/null
  tail -n 30 "$RESULTS/equivalence_tests.log" > "$OUT/equivalence_tests_tail.log" 2>/dev/null
  return 0
}
trap pack EXIT

# A carried .cache/ (the sdist, or a wheel built earlier) serves the offline machine; else the usual ~/.cache/sparkme.
if [ -z "${SPARKME_CACHE:-}" ] && [ -d .cache/minkowski ]; then export SPARKME_CACHE=$PWD/.cache; fi
if [ "$MODE" = "--dry-run" ]; then
  log "dry run: CPU build instead of the CUDA one, tests and benchmark on the CPU at tiny sizes"
  DEVICE=cpu
  ME_ARGS=(--device cpu)
  BENCH=(--models resnet18 --ratios 0.6,0.9 --batch-sizes 2 --image-size 64 --repeats 1 --warmup 0)
  TESTS=(tests/test_encoders.py -k "float64 and resnet18")
  BENCH3D=(--models resenc_tiny --ratios 0.75 --batch-sizes 1 --image-size 32 --repeats 1 --warmup 0)
else
  DEVICE=cuda
  ME_ARGS=(--device cuda --cuda-arch "${TORCH_CUDA_ARCH_LIST:-9.0}")
  BENCH=(--models resnet50,convnext_tiny --ratios 0.6,0.75,0.9 --batch-sizes 64 --repeats 5 --warmup 2)
  TESTS=(tests/test_encoders.py tests/test_sparse_map.py)
  BENCH3D=(--models resenc_l --ratios 0.75,0.9 --batch-sizes 2 --image-size 128 --repeats 3 --warmup 1)
fi
if [ -d wheels ]; then
  SITE=$(mktemp -d /tmp/sparkme-site-XXXX)
  step carried_wheels 60 $PY -m pip install --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sparkme from this checkout, no install needed
# one interpreter start: prints the versions, exits non-zero when torch sees no GPU
INFO=$($PY -c 'import sys, torch; gpu = torch.cuda.is_available()
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if gpu else None); sys.exit(0 if gpu else 3)' 2>&1); GPU_RC=$?
log "python: $INFO"
if [ "$DEVICE" = cuda ] && [ "$GPU_RC" -ne 0 ]; then
  log "torch sees no GPU: use --dry-run on a CPU machine"; exit 2
fi
step imports 60 $PY -c "import hydra, omegaconf, timm, sparkme; print('hydra', hydra.__version__, 'timm', timm.__version__)"
step minkowski_build 360 $PY tools/install_minkowski.py "${ME_ARGS[@]}" --jobs "$(nproc)"
step backends 30 $PY -c "import sparkme; print(sparkme.available_backends())"
export SPARKME_TEST_DEVICE=$DEVICE
step equivalence_tests 120 $PY -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
step train_step 60 $PY -m sparkme.cli debug=fast "trainer.device=$DEVICE" "run_dir=$RESULTS/train_step" backend=minkowski \
  logger.wandb_mode=disabled
step bench 180 $PY tools/bench.py "${BENCH[@]}" --device "$DEVICE" --train-step --out "$RESULTS/bench"
step bench3d 120 $PY tools/bench.py "${BENCH3D[@]}" --backends torch,minkowski --device "$DEVICE" --train-step \
  --out "$RESULTS/bench3d"
log "summary:"; tee -a "$RESULTS/gpu_check.log" < "$RESULTS/status.txt"
! grep -qv ' 0$' "$RESULTS/status.txt"
