"""Does SparK pretraining pay? One command, measured on the only real labelled images this machine has offline.

    .venv/bin/python tools/does_pretraining_pay.py --steps 600 --work runs/does_pretraining_pay

1. scikit-learn's 1,797 handwritten digits (``load_digits``, 8 x 8, 17 grey levels) are written as a labelled folder
   of 64 x 64 RGB PNGs (bicubic up-sampling), split 75 / 25 per class (seeded): ``train/<digit>/``, ``val/<digit>/``.
2. A ResNet-18 is SparK-pretrained on the train images (labels unused) for ``--steps`` steps on the CPU
   (``sparkme.engine.pretrain.pretrain``, the config composed with hydra as ``sparkme-pretrain`` composes it).
3. The pretrained encoder and the same encoder at random initialisation get the same evaluation: kNN, the linear
   probe (MAE's LARS, and SGD, which small sets need: ``sparkme/evaluation/linear_probe.py``) and a short
   fine-tune (``sparkme-finetune``'s loop, ``--finetune-epochs`` epochs of SparK's ResNet recipe).

The table (Markdown) is printed and written to ``<work>/results.md``, the figures to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from sparkme.cli import CONFIG_DIR

SIZE = 64


def write_digits(root: Path, seed: int = 0) -> tuple[int, int]:
    """The digits as ``root/{train,val}/<digit>/<i>.png`` (64 x 64 RGB); returns the train and val counts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=0.25, stratify=digits.target, random_state=seed)
    for split, chosen in (("train", train), ("val", val)):
        for index in chosen:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
            image = Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            image.convert("RGB").save(folder / f"{index}.png")
    return len(train), len(val)


def pretrain_resnet18(data: Path, run_dir: Path, steps: int, batch: int) -> dict:
    from sparkme.engine.pretrain import pretrain

    overrides = ["model=resnet18", "data=imagefolder", f"data.root={data}", "data.num_workers=2", f"image_size={SIZE}",
                 f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", "trainer.device=cpu",
                 "trainer.progress=false", "trainer.log_every=50", "trainer.vis_every=100000",
                 f"trainer.ckpt_every={steps}", "logger.wandb_mode=disabled", "export_formats=[]"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return pretrain(cfg)


def probe(init: str | None, data: Path, work: Path, optimizer: str) -> dict:
    from sparkme.evaluation import cli

    return cli.run(["model=resnet18", f"init={init or 'null'}", f"data.root={data}", f"image_size={SIZE}",
                    "num_workers=2", f"cache_dir={work / 'features'}", f"out={work / f'probe_{optimizer}.json'}",
                    f"linear.optimizer={optimizer}"])


def finetune(init: str | None, data: Path, run_dir: Path, epochs: int) -> dict | None:
    try:
        from sparkme.finetune.loop import finetune as finetune_loop
    except ImportError:
        return None
    config_dir = CONFIG_DIR / "finetune" if (CONFIG_DIR / "finetune" / "config.yaml").is_file() else CONFIG_DIR
    name = "config" if config_dir != CONFIG_DIR else "finetune"
    overrides = ["model=resnet18", f"init={init or 'null'}", f"data.root={data}", f"image_size={SIZE}",
                 f"recipe.epochs={epochs}", "recipe.warmup_epochs=1", "trainer.batch_size=32",
                 "trainer.device=cpu", "trainer.progress=false", "data.num_workers=2",
                 "logger.wandb_mode=disabled", "export_formats=[]"]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return finetune_loop(cfg)


def table(rows: dict[str, dict], steps: int, pretrain_s: float, finetune_epochs: int) -> str:
    lines = [f"| ResNet-18, digits 64 px | kNN top-1 | linear probe top-1 (LARS, MAE) | linear probe top-1 (SGD) | "
             f"fine-tune top-1 ({finetune_epochs} epochs) |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        fine = f"{row['finetune_top1']:.1f}" if row.get("finetune_top1") is not None else "n/a"
        lines.append(f"| {name} | {row['knn_top1']:.1f} | {row['lars_top1']:.1f} | {row['sgd_top1']:.1f} | {fine} |")
    lines.append("")
    lines.append(f"Pretraining: {steps} steps of batch 32 on the CPU ({pretrain_s / 60:.1f} min).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="SparK pretraining steps (batch 32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("runs/does_pretraining_pay"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    data = args.work / "digits"
    if not (data / "val").is_dir():
        print("digits: {} train / {} val images".format(*write_digits(data)))
    started = time.perf_counter()
    summary = pretrain_resnet18(data / "train", args.work / "pretrain", args.steps, args.batch)
    pretrain_s = time.perf_counter() - started
    checkpoint = str(Path(summary["run_dir"]) / "checkpoints" / "latest.pt")
    rows = {}
    for name, init in (("random init", None), (f"SparK, {args.steps} steps", checkpoint)):
        lars, sgd = probe(init, data, args.work, "lars"), probe(init, data, args.work, "sgd")
        tuned = finetune(init, data, args.work / f"finetune_{'random' if init is None else 'spark'}",
                         args.finetune_epochs)
        rows[name] = {"knn_top1": lars["knn_top1"], "knn_top5": lars["knn_top5"], "lars_top1": lars["linear_top1"],
                      "sgd_top1": sgd["linear_top1"], "finetune_top1": tuned["best_top1"] if tuned else None,
                      "extract_s": lars["extract_s"], "knn_s": lars["knn_s"]}
    text = table(rows, args.steps, pretrain_s, args.finetune_epochs)
    print(text)
    (args.work / "results.md").write_text(text + "\n")
    (args.work / "results.json").write_text(json.dumps({"steps": args.steps, "pretrain_s": pretrain_s,
                                                        "pretrain_final_loss": summary.get("final_loss"),
                                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
