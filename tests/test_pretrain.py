"""The SparK model and the pretraining CLI end to end (tiny configs on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torchvision
import wandb
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import open_dict
from PIL import Image

from conftest import ALL_BACKENDS, relative_error
from sparkme.cli import CONFIG_DIR
from sparkme.engine.checkpoint import load_checkpoint
from sparkme.engine.distributed import DistInfo
from sparkme.engine.logging import MetricsLogger
from sparkme.engine.pretrain import _build, pretrain
from sparkme.export import export_state_dict
from sparkme.masking import random_mask
from sparkme.models import build_spark
from sparkme.models.families import drop_path_rate, pretrain_betas

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["model", "backend", "data", "optim", "sched", "logger", "trainer", "experiment", "debug"]


def _compose(overrides: list[str], run_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def _timm_encoder_facts(name: str, drop_path_rate: float) -> tuple[list, int]:
    """(channels, reduction) of the four feature levels and the parameter count of timm's own feature extractor
    for them (everything up to the stride-32 level, no head), built on the meta device (no memory, no compute)."""
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}  # DenseNet takes no drop path
    with torch.device("meta"):
        info = timm.create_model(name, **kwargs).feature_info
        indices = [i for i, f in enumerate(info) if f["reduction"] >= 4]
        dense = timm.create_model(name, features_only=True, out_indices=indices, **kwargs)
    levels = list(zip(dense.feature_info.channels(), dense.feature_info.reduction()))
    return levels, sum(p.numel() for p in dense.parameters())


def _check_run_is_what_the_config_says(run, cfg) -> None:
    """The objects ``_build`` made from ``cfg`` have the configured types and values (not just a name)."""
    encoder = run.spark.encoder
    assert encoder.backend == cfg.backend.name
    rate = drop_path_rate(cfg.model.model_name, cfg.model.drop_path_rate)  # null in the YAML: the family's
    levels, parameters = _timm_encoder_facts(cfg.model.model_name, rate)
    assert [(f["num_chs"], f["reduction"]) for f in encoder.feature_info] == levels
    assert sum(p.numel() for p in encoder.parameters()) == parameters
    drop_path = max((float(getattr(m, "drop_prob", 0.0) or 0.0) for m in encoder.modules()), default=0.0)
    assert drop_path == pytest.approx(rate)
    assert run.spark.mask_ratio == cfg.mask_ratio
    assert type(run.dataset.dataset) is get_class(cfg.data.dataset._target_)
    expected_length = cfg.data.dataset.get("crops_per_epoch") or cfg.data.dataset.get("length")
    if expected_length:
        assert len(run.dataset.dataset) == expected_length
    assert type(run.trainer.optimizer) is get_class(cfg.optim.optimizer._target_)
    assert tuple(run.trainer.optimizer.defaults["betas"]) == pretrain_betas(cfg.model.model_name,
                                                                            cfg.optim.optimizer.betas)
    batch = cfg.trainer.batch_size * cfg.trainer.accum_steps
    assert run.tally.images_per_step == batch and run.trainer.accum == cfg.trainer.accum_steps
    peak = cfg.optim.base_lr * batch / 256
    assert run.steps_per_epoch == len(run.dataset) // batch
    assert run.total_steps == (cfg.trainer.max_steps or cfg.trainer.epochs * run.steps_per_epoch)
    warmup = int(cfg.sched.warmup_epochs * run.steps_per_epoch)
    assert run.schedule.step(0)[1] == pytest.approx(cfg.sched.wd_start)
    if warmup < run.total_steps:
        assert run.schedule.step(warmup)[0] == pytest.approx(peak)
    assert run.schedule.weight_decay(run.total_steps) == pytest.approx(cfg.sched.wd_end)
    assert run.trainer.scaler.is_enabled() == (cfg.trainer.amp == "fp16")
    assert run.trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg.trainer.amp]


def _check_wandb_is_opened_as_configured(cfg, run_dir: Path, monkeypatch) -> None:
    """The wandb run is opened with the configured mode and project (wandb.init replaced: no network here)."""
    opened = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: opened.update(kwargs) or SimpleNamespace(id="x"))
    MetricsLogger(run_dir, cfg.logger.wandb_mode, cfg.logger.project, cfg.name)
    if cfg.logger.wandb_mode == "disabled":
        assert opened == {}
    else:
        assert (opened["mode"], opened["project"], opened["name"]) == (cfg.logger.wandb_mode, cfg.logger.project,
                                                                      cfg.name)


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_group_builds_the_objects_it_configures(group, tmp_path, monkeypatch):
    for name in ("a.png", "b.png"):  # data=imagefolder holds one of them out (data.holdout_fraction)
        Image.new("RGB", (40, 30)).save(tmp_path / name)
    for option in _options(group):
        overrides = [f"{group}={option}"]
        data = _compose(overrides).data
        if data.get("spatial_dims") == 3:
            continue  # 3D volumes and models: built and checked by tests/test_volumes_configs.py
        if data.name == "shards":
            continue  # needs shards: built and trained by tests/test_shards_resume.py, checked by test_shards_startup
        # keys(), not `in`: OmegaConf's `in` is False for a mandatory value not yet given (root: ???)
        if group in ("experiment", "data") and "root" in data.keys():  # not experiment=demo's photos
            overrides.append(f"data.root={tmp_path}")
        cfg = _compose(overrides, tmp_path / "run")
        if group == "logger":
            _check_wandb_is_opened_as_configured(cfg, tmp_path, monkeypatch)
            continue
        with open_dict(cfg):
            cfg.model.decoder_width = 32  # the decoder is not under test; keeps the paper models small
            if group in ("experiment", "data"):
                cfg.trainer.batch_size = 1  # one image in the folder
        run = _build(cfg, DistInfo())
        _check_run_is_what_the_config_says(run, cfg)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_three_step_run_writes_everything(backend, tmp_path):
    cfg = _compose([f"backend={backend}", "debug=fast", "logger.wandb_mode=offline"], tmp_path)
    summary = pretrain(cfg)
    assert summary["step"] == 3 and len(summary["first_losses"]) == 3
    assert all(torch.isfinite(torch.tensor(summary["first_losses"])))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert {"loss", "lr", "wd", "grad_norm", "img_per_s"} <= set(records[1])
    assert (tmp_path / "reconstructions" / "step_0000003.png").stat().st_size > 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["step"] == 3
    exported = torch.load(summary["export_timm"], weights_only=True)
    timm.create_model("resnet18", num_classes=0).load_state_dict(exported, strict=True)


def test_same_seed_and_mask_give_the_same_loss_on_every_backend():
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    mask = random_mask(2, 2, 3, 0.6, generator=torch.Generator().manual_seed(1))
    losses = {}
    for backend in ALL_BACKENDS:
        torch.manual_seed(0)
        losses[backend] = build_spark("convnextv2_atto", backend, decoder_width=64)(images, mask)
    for backend in ALL_BACKENDS:
        assert relative_error(losses[backend], losses["masked"]) <= 1e-4, losses


def test_loss_equals_an_independent_spark_loss_computation():
    torch.manual_seed(0)
    model = build_spark("resnet18", "torch", decoder_width=32)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[True, False], [False, False]], [[False, True], [True, False]]])
    loss = model(images, mask)
    reconstruction = model.reconstruct_normalised(images, mask).detach()
    total, count = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if mask[b, i, j]:
                    continue
                patch = images[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32].double()
                target = (patch - patch.mean()) / (patch.var(unbiased=True) + 1e-6).sqrt()
                predicted = reconstruction[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32].double()
                total += ((predicted - target) ** 2).mean().item()
                count += 1
    assert abs(loss.item() - total / count) <= 1e-5 * abs(total / count)


def _final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")["model"]


def test_resume_auto_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    # log_every=2 with a stop at 3: the resumed run's line at step 4 averages steps 3 and 4, as the straight run's
    common = ["debug=fast", "backend=torch", "trainer.max_steps=6", "trainer.deterministic=true",
              "model=convnext_atto", "model.drop_path_rate=0.1", "trainer.log_every=2"]
    pretrain(_compose(common, tmp_path / "straight"))
    first = pretrain(_compose(common + ["trainer.stop_at_step=3"], tmp_path / "split"))
    assert first["stopped_by"] == "trainer.stop_at_step" and first["step"] == 3
    second = pretrain(_compose(common + ["resume=auto"], tmp_path / "split"))
    assert second["start_step"] == 3 and second["step"] == 6
    straight, split = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    logs = {name: [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
                   for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "split")}
    assert [r["step"] for r in logs["split"]] == [0, 2, 4, 6, 6]
    assert logs["split"] == logs["straight"]


def test_two_process_torchrun_ends_with_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "-m", "sparkme.cli", "debug=fast", "backend=minkowski", f"run_dir={tmp_path}", "trainer.device=cpu"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):result.stdout.rindex("}") + 1])
    assert summary["weights_identical_across_ranks"] is True
    assert summary["step"] == 3


def test_export_loads_strict_into_torchvision_resnet50_and_timm_convnext_tiny():
    resnet = build_spark("resnet50", "torch", decoder_width=32).encoder
    torchvision.models.resnet50().load_state_dict(export_state_dict(resnet, "resnet50", "torchvision"), strict=True)
    convnext = build_spark("convnext_tiny", "torch", decoder_width=32).encoder
    state = export_state_dict(convnext, "convnext_tiny", "timm")
    timm.create_model("convnext_tiny", num_classes=0).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="format=torchvision supports"):
        export_state_dict(convnext, "convnext_tiny", "torchvision")


def test_export_cli_from_a_checkpoint(tmp_path):
    pretrain(_compose(["debug=fast", "backend=torch"], tmp_path))
    out = tmp_path / "resnet18_tv.pt"
    result = subprocess.run([sys.executable, "-m", "sparkme.export", f"ckpt={tmp_path}/checkpoints/latest.pt",
                             "format=torchvision", f"out={out}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_multirun_sweeps_over_backends_and_slurm_launcher_composes(tmp_path):
    command = [sys.executable, "-m", "sparkme.cli", "-m", "backend=torch,masked", "debug=fast",
               f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["0_resnet18_torch_samples", "1_resnet18_masked_samples"]
    assert all((tmp_path / run / "checkpoints" / "latest.pt").exists() for run in runs)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 8
