#!/usr/bin/env bash
# Re-make every picture of the documentation (docs/assets/*.png) on a CPU: the demo run (its loss curves and the
# reconstruction grid at steps 0 and 384), the demo's settings run 32 epochs instead of 12 (1,024 steps: the
# labelled reconstruction grid at steps 0, 256 and 1,024 of the home page and the pretraining guide), and the speed
# chart from the committed benchmark output. About 7 + 20 minutes on a 2-core Xeon; runs niced, on one thread
# (other work keeps the other core).
#   bash tools/docs_pictures.sh [runs folder, default runs/docs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-runs/docs}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled
PRETRAIN=(nice -n 10 .venv/bin/sparkme-pretrain logger.wandb_mode=disabled trainer.progress=false)
# the demo, as tools/demo.sh runs it (384 steps), keeping its weights at steps 128, 256 and 384
"${PRETRAIN[@]}" experiment=demo trainer.ckpt_every=128 trainer.keep_every=128 run_dir="$RUNS/demo"
.venv/bin/python tools/docs_pictures.py curves --run "$RUNS/demo" --out docs/assets/demo_loss.png
.venv/bin/python tools/docs_pictures.py reconstruction --run "$RUNS/demo" --steps 0 384 \
    --out docs/assets/reconstruction.png
# the longer run: the demo's settings for 32 epochs (1,024 steps), keeping its weights every 128 steps
"${PRETRAIN[@]}" experiment=demo trainer.epochs=32 trainer.ckpt_every=128 trainer.keep_every=128 \
    run_dir="$RUNS/demo_long"
.venv/bin/python tools/docs_pictures.py reconstruction --run "$RUNS/demo_long" --steps 0 256 1024 --labels \
    --out docs/assets/reconstruction_long.png
.venv/bin/python tools/docs_pictures.py speed --bench docs/bench/2026-11-29_whole_step.txt \
    --out docs/assets/speedup.png \
    --title "2-core Intel Xeon (AVX-512, AMX), 2 threads, 224 px, batch 8, one run per bar"
