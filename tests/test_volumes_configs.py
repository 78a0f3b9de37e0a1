"""Every 3D config (data=volumes, experiment=spark3d_*) composes to what it says and builds its run: the model, the
volume crops and the optimizer's settings, at a tiny size (the generic 2D check of every config group leaves them
here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from sparkme.cli import CONFIG_DIR
from sparkme.data.volumes import VolumeFolder
from sparkme.data.volumes_synthetic import write_blob_volumes
from sparkme.engine.config_checks import check_config
from sparkme.engine.distributed import DistInfo
from sparkme.engine.pretrain import _build

THREE_D = sorted(f"experiment={p.stem}" for p in (Path(CONFIG_DIR) / "experiment").glob("spark3d_*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_the_resenc_l_preset_says_nnssls_settings():
    cfg = _compose(["experiment=spark3d_resenc_l", "data.root=/nowhere"])
    assert cfg.model.model_name == "resenc_l" and cfg.data.crop_size == 160 and cfg.mask_ratio == 0.75
    assert cfg.trainer.clip_grad == 12.0 and cfg.model.loss == "norm_pix" and cfg.data.name == "volumes"


@pytest.mark.parametrize("choice", ["data=volumes", *THREE_D])
def test_every_3d_config_passes_its_checks_and_builds_its_run(choice, tmp_path):
    write_blob_volumes(tmp_path / "volumes", 3, (32, 32, 32))
    # the smallest 3D model on 32^3 crops: the build is under test, not ResEnc-L's size
    cfg = _compose([choice, f"data.root={tmp_path / 'volumes'}", "model=volumes/resenc_tiny", "data.crop_size=32",
                    "model.decoder_width=16", "trainer.batch_size=1", f"run_dir={tmp_path / 'run'}"])
    with open_dict(cfg):
        cfg.data.holdout_volumes = min(cfg.data.holdout_volumes, 1)
    check_config(cfg)
    run = _build(cfg, DistInfo())
    assert run.spark.spatial_dims == 3 and run.spark.mask_ratio == cfg.mask_ratio
    assert isinstance(run.dataset.dataset, VolumeFolder)
    crop = run.dataset[(0, 0)]
    assert crop.shape == (cfg.data.channels, 32, 32, 32)
    assert run.trainer.clip_grad == cfg.trainer.clip_grad
