"""What a newcomer gets without naming an experiment: SparK's recipe for the chosen model (checked against the
``experiment=spark_*`` presets and the family table), the CPU demo as ``experiment=demo``, a held-out split of an image
folder, the linear probe's optimizer rule, and the benchmark naming its CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from sparkme.cli import CONFIG_DIR
from sparkme.data.imagefolder import ImageFolderDataset, holdout_indices
from sparkme.errors import UsageError
from sparkme.evaluation.linear_probe import LinearProbeSettings, choose_optimizer, lars_reach, linear_probe
from sparkme.models import families

REPO = Path(__file__).resolve().parent.parent
# Per process, not the recipe: the presets state the per-GPU batch and SyncBN of a multi-GPU ImageNet run.
HARDWARE_KEYS = ("batch_size", "sync_bn")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _recipe(cfg) -> dict:
    """Everything of a composed pretraining config that decides the maths of a run (not where it runs)."""
    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if k not in HARDWARE_KEYS}
    return {"image_size": cfg.image_size, "mask_ratio": cfg.mask_ratio, "model": OmegaConf.to_container(cfg.model),
            "optim": OmegaConf.to_container(cfg.optim), "sched": OmegaConf.to_container(cfg.sched),
            "trainer": trainer, "data": OmegaConf.to_container(cfg.data)}


@pytest.mark.parametrize("model, experiment", [("resnet50", "spark_resnet50_in1k"),
                                               ("convnext_small", "spark_convnext_small_in1k")])
def test_plain_command_on_a_folder_is_the_paper_preset(model, experiment):
    plain = _compose(["data=imagefolder", "data.root=/images", f"model={model}"])
    preset = _compose([f"experiment={experiment}", "data.root=/images"])
    assert _recipe(plain) == _recipe(preset)
    # and both are SparK's (DESIGN: 224 px, decoder 768, 2e-4 x batch/256, wd 0.04 -> 0.2, clip 5, 1600 epochs,
    # 40 of warm-up, float32; betas and drop path null = the family table's)
    recipe = families.PRETRAIN_RECIPE
    assert (plain.image_size, plain.mask_ratio, plain.model.decoder_width) == (224, 0.6, 768)
    assert (plain.optim.base_lr, plain.sched.wd_start, plain.sched.wd_end, plain.trainer.clip_grad) == (
        recipe.base_lr, recipe.weight_decay, recipe.weight_decay_end, recipe.clip_grad)
    assert (plain.trainer.epochs, plain.sched.warmup_epochs, plain.trainer.amp) == (1600, 40, None)
    assert plain.optim.optimizer.betas is None and plain.model.drop_path_rate is None
    assert plain.backend.name == "torch"


def test_the_demo_is_a_named_experiment_that_tools_demo_passes():
    demo = _compose(["experiment=demo"])
    assert (demo.model.model_name, demo.data.name, demo.image_size, demo.model.decoder_width) == (
        "resnet18", "samples", 96, 256)
    assert (demo.optim.base_lr, demo.sched.warmup_epochs, demo.trainer.epochs, demo.trainer.batch_size) == (
        0.016, 1, 12, 16)
    assert "sparkme-pretrain experiment=demo" in (REPO / "tools" / "demo.sh").read_text()


def _folder(root: Path, count: int) -> Path:
    root.mkdir()
    for i in range(count):
        Image.new("RGB", (40, 32), (i * 20 % 256, 0, 0)).save(root / f"{i:02d}.png")
    return root


def test_holdout_split_is_seeded_disjoint_and_left_out_of_training(tmp_path):
    root = _folder(tmp_path / "images", 10)
    cfg = _compose(["data=imagefolder", f"data.root={root}", "data.holdout_fraction=0.2", "seed=3"])
    train = instantiate(cfg.data.dataset, transform=None)
    held = instantiate(cfg.data.holdout, transform=None)
    assert len(held) == 2 and len(train) == 8
    assert not set(train.files) & set(held.files)
    assert sorted(train.files + held.files) == sorted(root.glob("*.png"))
    assert holdout_indices(10, 0.2, 3) == holdout_indices(10, 0.2, 3)
    assert any(holdout_indices(10, 0.2, 3) != holdout_indices(10, 0.2, seed) for seed in range(4, 8))
    assert len(holdout_indices(1000, 0.01, 0)) == 10 and len(holdout_indices(10, 0.01, 0)) == 1


def test_holdout_without_images_or_a_bad_fraction_is_refused(tmp_path):
    root = _folder(tmp_path / "images", 3)
    with pytest.raises(UsageError, match="holdout_fraction=0 holds no image out"):
        ImageFolderDataset(str(root), None, holdout_fraction=0.0, split="holdout")
    with pytest.raises(UsageError, match=r"must be a number in \[0, 1\)"):
        ImageFolderDataset(str(root), None, holdout_fraction=1.0)
    with pytest.raises(UsageError, match="needs at least 2 images"):
        holdout_indices(1, 0.5, 0)
    assert len(ImageFolderDataset(str(root), None)) == 3  # no fraction: every image trains


def test_probe_optimizer_rule_is_lars_where_it_can_move_the_weight():
    settings = LinearProbeSettings()  # MAE's: 90 epochs, blr 0.1, trust 0.001
    assert lars_reach(settings, 28_445) >= 1.0 > lars_reach(settings, 28_444)
    assert choose_optimizer(settings, 28_444) == "sgd" and choose_optimizer(settings, 28_445) == "lars"
    assert choose_optimizer(LinearProbeSettings(optimizer="lars"), 10) == "lars"
    assert choose_optimizer(LinearProbeSettings(optimizer="sgd"), 10**7) == "sgd"
    assert OmegaConf.load(Path(CONFIG_DIR) / "probe.yaml").linear.optimizer == "auto"
    features, labels = torch.randn(24, 8, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 3
    result = linear_probe(features, labels, features, labels, 3, LinearProbeSettings(epochs=1, warmup_epochs=0))
    assert result["optimizer"] == "sgd"


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no rows: an empty speed-up plot
def test_the_benchmark_names_the_cpu(tmp_path):
    from sparkme.bench.report import cpu_model, write_results

    name = cpu_model()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.lower().startswith("model name")), None)
        assert model is None or name.startswith(model)
    assert name.endswith("logical CPUs")
    write_results([], tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["cpu"] == name
