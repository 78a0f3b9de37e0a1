"""The fine-tuning guide's pictures: a confusion matrix and an accuracy curve, from one real fine-tune on the CPU.

    .venv/bin/python tools/finetune_pictures.py            # a few minutes on 2 CPU cores

1. A labelled folder of generated patterns (the ones ``tests/test_finetune.py`` fine-tunes on: stripes across,
   stripes down, a checkerboard and a disc, each in its own colours, with random period, phase and noise), 48 px,
   ``--per-class`` training and half as many validation images per class.
2. ``sparkme-finetune`` trains a ResNet-18 from random initialisation with its preset (SparK's ResNet recipe: LAMB,
   BCE, mixup / CutMix, TrivialAugment, random erasing, EMA) for ``--epochs`` epochs, at a base lr of 0.125
   instead of the preset's 2e-3, which is tuned for a pretrained encoder and barely moves a random one in a few
   epochs. The command is printed; docs/finetuning.md shows it beside the pictures.
3. The run's own ``confusion_matrix.png`` is copied to ``docs/assets/finetuning/``, and ``accuracy.png`` is drawn
   there from its ``metrics.jsonl`` (top-1 of the model and of its EMA after every epoch, and the training loss).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_finetune import make_labelled_folder  # noqa: E402 - the tests' generated patterns


def finetune_command(data: Path, run_dir: Path, epochs: int) -> list[str]:
    """The fine-tune the pictures show (docs/finetuning.md gives it with ``data.root=digits``)."""
    return ["sparkme-finetune", "model=resnet18", "init=null", f"data.root={data}", "image_size=48",
            "trainer.batch_size=32", f"recipe.epochs={epochs}", "recipe.warmup_epochs=1", "recipe.base_lr=0.125",
            "data.num_workers=2", "logger.wandb_mode=disabled", "trainer.progress=false", f"run_dir={run_dir}"]


def draw_accuracy(metrics: Path, out: Path, title: str) -> Path:
    """Top-1 (%) of the model and of its EMA per epoch, and the training loss, from a fine-tune's
    ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    evaluations = [r for r in records if "model_top1" in r]
    steps_per_epoch = evaluations[0]["step"] / evaluations[0]["epoch"]
    losses = [r for r in records if "loss" in r and "model_top1" not in r]
    figure, accuracy = plt.subplots(figsize=(6.4, 3.6))
    epochs = [r["epoch"] for r in evaluations]
    accuracy.plot(epochs, [r["model_top1"] for r in evaluations], "o-", label="model, val top-1")
    accuracy.plot(epochs, [r["ema_top1"] for r in evaluations], "s--", label="EMA, val top-1")
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("top-1 (%)")
    accuracy.set_ylim(0, 100)
    accuracy.grid(alpha=0.3)
    loss = accuracy.twinx()
    loss.plot([r["step"] / steps_per_epoch for r in losses], [r["loss"] for r in losses], color="grey", alpha=0.5,
              linewidth=0.8, label="training loss")
    loss.set_ylabel("training loss (BCE)")
    handles = accuracy.get_legend_handles_labels()[0] + loss.get_legend_handles_labels()[0]
    accuracy.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    accuracy.set_title(title, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=48)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "finetune_pictures")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "assets" / "finetuning")
    args = parser.parse_args()
    data, run_dir = args.work / "patterns", args.work / "run"
    if not (data / "train").is_dir():
        make_labelled_folder(data, per_class=(args.per_class, args.per_class // 2))
    command = finetune_command(data, run_dir, args.epochs)
    print(" ".join(command), flush=True)
    executable = Path(sys.executable).parent / command[0]
    subprocess.run([str(executable), *command[1:]], check=True)
    summary = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "confusion_matrix.png", args.out / "confusion_matrix.png")
    draw_accuracy(run_dir / "metrics.jsonl", args.out / "accuracy.png",
                  f"ResNet-18 from random init, 4 generated patterns: {args.epochs} epochs of SparK's recipe")
    print(f"best top-1 {summary.get('best_top1')}; pictures in {args.out}")


if __name__ == "__main__":
    main()
