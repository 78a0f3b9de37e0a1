"""sparkme-finetune end to end: it learns, resumes bit-identically after kill -9 (EMA included), starts from
pretrained files with only the head new, exports a strict classifier, and refuses bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from sparkme.engine.checkpoint import load_checkpoint
from sparkme.engine.distributed import DistInfo
from sparkme.finetune import loop
from sparkme.finetune.cli import FINETUNE_CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
PATTERNS = ("horizontal", "vertical", "checker", "disc")


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(size, size, 3)`` uint8 image whose class is its pattern and its colours (phase, period and noise are
    random): easy enough that a few epochs from random init learn it under SparK's augmentation and mixing."""
    y, x = np.mgrid[0:size, 0:size]
    period, phase = rng.integers(6, 12), rng.integers(0, 12)
    shape = {"horizontal": (y + phase) // period % 2 == 0, "vertical": (x + phase) // period % 2 == 0,
             "checker": ((x + phase) // period + (y + phase) // period) % 2 == 0,
             "disc": (x - size / 2 - phase / 4) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2}.get(kind)
    shape = (x + y) % 2 == 0 if shape is None else shape  # any other class name: a fine grid
    hue = PATTERNS.index(kind) if kind in PATTERNS else 0
    colours = np.array([[(200 if channel == hue % 3 else 40) for channel in range(3)], [20 + 40 * (hue // 3)] * 3])
    image = np.where(shape[..., None], colours[0], colours[1]) + rng.normal(0, 12, size=(size, size, 3))
    return image.clip(0, 255).astype(np.uint8)


def make_labelled_folder(root: Path, per_class: tuple[int, int] = (16, 8), size: int = 48,
                         classes: tuple[str, ...] = PATTERNS, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` of generated patterns."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for kind in classes:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(_pattern(kind, size, rng)).save(folder / f"{index}.png")
    return root


def _compose(overrides: list[str], run_dir: Path):
    with initialize_config_dir(config_dir=str(FINETUNE_CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger.wandb_mode=disabled", "trainer.progress=false",
                                                         "data.num_workers=0", *overrides])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


TINY = ["model=resnet18", "image_size=32", "trainer.batch_size=8", "trainer.eval_batch_size=32",
        "trainer.device=cpu", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("patterns"))


def test_a_short_finetune_learns_and_exports_a_strict_classifier(patterns, tmp_path):
    # ResNet-18's preset (LAMB, BCE, mixup/CutMix, layer decay) at SparK's peak lr (2e-3 x 2048 / 256 = 0.016)
    cfg = _compose([*TINY, f"data.root={patterns}", "image_size=48", "recipe.epochs=4", "recipe.warmup_epochs=1",
                    "recipe.base_lr=0.5", "export_formats=[timm,torchvision]"], tmp_path)
    summary = loop.finetune(cfg)
    assert summary["best_top1"] >= 60.0, summary  # 4 classes: chance is 25 %
    assert summary["step"] == 4 * (64 // 8)
    exported = torch.load(summary["export_timm"], weights_only=True)
    timm.create_model("resnet18", num_classes=4).load_state_dict(exported, strict=True)
    torchvision.models.resnet18(num_classes=4).load_state_dict(exported, strict=True)
    table = Path(summary["per_class_accuracy"]).read_text()
    assert all(kind in table for kind in PATTERNS)
    assert Path(summary["confusion_matrix"]).stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "model_top1" in r]
    assert len(evaluations) == 4 and all("ema_top1" in r and "model_top5" in r for r in evaluations)
    assert max(max(r["model_top1"], r["ema_top1"]) for r in evaluations) == summary["best_top1"]


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparkme.finetune.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kwargs)


def test_a_finetune_killed_with_sigkill_resumes_bit_identically(patterns, tmp_path):
    args = [*TINY, f"data.root={patterns}", "trainer.max_steps=12", "trainer.ckpt_every=2",
            "logger.wandb_mode=disabled", "trainer.progress=false", "data.num_workers=0"]
    whole = _run_cli([*args, f"run_dir={tmp_path / 'whole'}"])
    victim = _run_cli([*args, f"run_dir={tmp_path / 'victim'}"])
    latest = tmp_path / "victim" / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if latest.exists() and load_checkpoint(latest)["step"] >= 4:
            break
        time.sleep(0.2)
    assert victim.poll() is None, victim.communicate()[1][-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = load_checkpoint(latest)["step"]
    assert 4 <= killed_at < 12
    resumed = _run_cli([*args, f"run_dir={tmp_path / 'victim'}", "resume=auto"])
    for process in (whole, resumed):
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    final = {name: load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt") for name in ("whole", "victim")}
    for part in ("model",):
        assert all(torch.equal(final["whole"][part][k], final["victim"][part][k]) for k in final["whole"][part])
    ema_whole, ema_victim = final["whole"]["extra"]["ema"], final["victim"]["extra"]["ema"]
    assert all(torch.equal(ema_whole[k], ema_victim[k]) for k in ema_whole)
    assert final["whole"]["extra"]["best"] == final["victim"]["extra"]["best"]
    lines = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("whole", "victim")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in ls] for ls in lines]
    assert strip[0] == strip[1]


def test_pretrained_files_load_with_only_the_head_new(patterns, tmp_path):
    dense = timm.create_model("resnet18", num_classes=0)
    spark_timm_style = {k: v.clone() for k, v in dense.state_dict().items()}  # *_1kpretrained_timm_style.pth
    torch.save(spark_timm_style, tmp_path / "res18_timm_style.pth")
    run = loop._build(_compose([*TINY, f"data.root={patterns}", f"init={tmp_path / 'res18_timm_style.pth'}"],
                               tmp_path / "run"), DistInfo())
    state = run.classifier.state_dict()
    assert all(torch.equal(state[k], v) for k, v in spark_timm_style.items())
    assert {k for k in state if k not in spark_timm_style} == {"fc.weight", "fc.bias"}


def test_a_format_spark_export_and_a_pretraining_checkpoint_load_with_only_the_head_new(patterns, tmp_path):
    from sparkme.export import export_state_dict
    from sparkme.models import build_spark

    spark = build_spark("convnext_atto", "torch", decoder_width=32)
    dense = spark.encoder.to_dense().state_dict()
    torch.save(export_state_dict(spark.encoder, "convnext_atto", "spark"), tmp_path / "cnx_official_style.pth")
    torch.save({"model": spark.state_dict(), "step": 3}, tmp_path / "latest.pt")
    for name in ("cnx_official_style.pth", "latest.pt"):
        run = loop._build(_compose([*TINY, "model=convnext_atto", f"data.root={patterns}", f"init={tmp_path / name}"],
                                   tmp_path / name.replace(".", "_")), DistInfo())
        state = run.classifier.state_dict()
        loaded = [k for k in state if not k.startswith("head.")]
        assert loaded and all(torch.equal(state[k], dense[k]) for k in loaded), name
        assert all(k.startswith("head.") for k in set(state) - set(loaded))


BAD = {
    "no_root": ([], "data.root is required"),
    "missing_root": (["data.root={tmp}/nowhere"], "nowhere"),
    "one_class": (["data.root={one_class}"], "class"),
    "unknown_model": (["model=resnet5", "data.root={patterns}"], "resnet5"),
    "bad_recipe": (["recipe.optimizer=sgd", "data.root={patterns}"], "recipe.optimizer must be lamb or adamw"),
    "wrong_model_init": (["data.root={patterns}", "init={convnext}"], "unknown checkpoint layout (first keys ['stem.0"),
    "bad_batch": (["data.root={patterns}", "trainer.batch_size=0"], "trainer.batch_size must be an integer >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_ends_in_one_line_with_exit_status_2(case, patterns, tmp_path):
    one_class = make_labelled_folder(tmp_path / "one", per_class=(2, 1), classes=("only",))
    convnext = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", num_classes=0).state_dict(), convnext)
    overrides, expected = BAD[case]
    args = [a.format(tmp=tmp_path, one_class=one_class, patterns=patterns, convnext=convnext) for a in overrides]
    process = _run_cli([*args, f"run_dir={tmp_path / 'run'}", "trainer.device=cpu"])
    _, stderr = process.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("sparkme-finetune: error: ") and expected in lines[0], lines


def test_the_knn_monitor_logs_while_pretraining_and_after_a_resume_the_same(patterns, tmp_path):
    from sparkme.engine.pretrain import pretrain

    def knn_lines(run_dir: Path, stop_at: int | None, resume: bool) -> list[dict]:
        with initialize_config_dir(config_dir=str(FINETUNE_CONFIG_DIR.parent), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "debug=fast", "backend=torch", f"eval.root={patterns}", "eval.every=2", "eval.per_class=4",
                "eval.val_per_class=2", "trainer.max_steps=4", "trainer.ckpt_every=2", "data.num_workers=0",
                f"trainer.stop_at_step={stop_at or 'null'}", f"resume={'auto' if resume else 'null'}"])
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        pretrain(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "knn_top1" in r]

    whole = knn_lines(tmp_path / "whole", None, False)
    assert [r["step"] for r in whole] == [2, 4] and all(0 <= r["knn_top1"] <= 100 for r in whole)
    knn_lines(tmp_path / "split", 2, False)
    assert knn_lines(tmp_path / "split", None, True) == whole
