"""One table of family facts (``sparkme.models.families``): the API, the command line's composed config and the
benchmark build the same pretraining drop path and optimizer betas for every model in ``conf/model/``.

Models are built on the ``meta`` device: shapes and settings only, no memory, no arithmetic.
"""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparkme.bench import steps
from sparkme.cli import CONFIG_DIR
from sparkme.errors import UsageError
from sparkme.models import build_spark, families

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
META = torch.device("meta")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _drop_path(model: torch.nn.Module) -> float:
    """The stochastic-depth rate a model was built with: timm ramps it up to the configured rate at the last block."""
    return max((float(getattr(m, "drop_prob", 0.0) or 0.0) for m in model.modules()), default=0.0)


def _cli_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The optimizer as the pretraining engine builds it from the composed config."""
    overrides = families.optimizer_overrides(cfg.model.model_name, cfg.optim.optimizer)
    return instantiate(cfg.optim.optimizer, _convert_="all", **overrides)(params, lr=1e-3)


# One ResNet and one ConvNeXt in the fast run; every model config in the slow one (~1.5 s each: three conversions).
FAST_CONFIGS = ("resnet50", "convnext_small")


@pytest.mark.parametrize("option", [option if option in FAST_CONFIGS else pytest.param(option, marks=pytest.mark.slow)
                                    for option in MODEL_CONFIGS])
def test_api_cli_and_bench_build_the_same_drop_path_and_betas(option):
    cfg = _compose([f"model={option}", "model.decoder_width=32", "backend=masked"])
    name = cfg.model.model_name
    with torch.device(META):
        api = build_spark(name, "masked", decoder_width=32)
        cli = instantiate(cfg.model)
        bench = steps.build_model(name, META, decoder_width=32)
        bench_betas = steps.make_optimizer(bench, name, batch=8).defaults["betas"]
        cli_betas = _cli_optimizer(cfg, cli.parameters()).defaults["betas"]
    expected_rate = families.drop_path_rate(name)
    assert _drop_path(api) == _drop_path(cli) == _drop_path(bench) == pytest.approx(expected_rate)
    assert tuple(cli_betas) == tuple(bench_betas) == families.family_of(name).betas
    assert api.encoder.densify_norm == cli.encoder.densify_norm == families.family_of(name).densify_norm


@pytest.mark.parametrize("optim", ["lamb", "adamw"])
@pytest.mark.parametrize("model, beta2", [("convnext_small", 0.999), ("convnextv2_atto", 0.999), ("resnet50", 0.95),
                                          ("efficientnet_b0", 0.95)])
def test_betas_follow_the_family_unless_the_user_sets_them(optim, model, beta2):
    params = [torch.nn.Parameter(torch.zeros(2))]
    default = _cli_optimizer(_compose([f"model={model}", f"optim={optim}"]), params)
    assert tuple(default.defaults["betas"]) == (0.9, beta2)  # SparK's arg_util.py: (0.9, ada)
    chosen = _cli_optimizer(_compose([f"model={model}", f"optim={optim}", "optim.optimizer.betas=[0.8,0.9]"]), params)
    assert tuple(chosen.defaults["betas"]) == (0.8, 0.9)


@pytest.mark.parametrize("model, rate", [("resnet50", 0.05), ("resnet200", 0.15), ("convnext_small", 0.2),
                                         ("convnext_large", 0.4), ("resnet18", 0.0)])
def test_drop_path_is_sparks_unless_the_user_sets_it(model, rate):
    assert families.drop_path_rate(model) == rate  # SparK's pretrain/models/__init__.py
    with torch.device(META):
        chosen = instantiate(_compose([f"model={model}", "model.drop_path_rate=0.01", "backend=masked"]).model)
    assert _drop_path(chosen) == pytest.approx(0.01)


def test_config_groups_state_the_recipe_of_the_table():
    recipe = families.PRETRAIN_RECIPE
    groups = {group: OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
              for group, option in [("optim", "lamb"), ("sched", "spark"), ("trainer", "default")]}
    assert (groups["optim"].base_lr, groups["sched"].wd_start, groups["sched"].wd_end, groups["trainer"].clip_grad) == (
        recipe.base_lr, recipe.weight_decay, recipe.weight_decay_end, recipe.clip_grad)


@pytest.mark.parametrize("experiment", ["spark_resnet50_in1k", "spark_convnext_small_in1k"])
def test_paper_experiments_build_the_betas_and_drop_path_of_the_table(experiment):
    cfg = _compose([f"experiment={experiment}", "data.root=/nonexistent"])
    name = cfg.model.model_name
    betas = _cli_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))]).defaults["betas"]
    assert tuple(betas) == families.family_of(name).betas
    assert families.drop_path_rate(name, cfg.model.drop_path_rate) == families.DROP_PATH[name]


@pytest.mark.parametrize("experiment", ["spark_resnet50_in1k", "spark_convnext_small_in1k"])
def test_paper_experiments_state_the_paper_recipe(experiment):
    cfg = _compose([f"experiment={experiment}", "data.root=/nonexistent"])
    assert (cfg.image_size, cfg.model.decoder_width, cfg.optim.base_lr) == (224, 768, families.PRETRAIN_RECIPE.base_lr)


def test_every_family_finds_its_tested_model_and_unknown_names_list_the_families():
    for family in families.FAMILIES:
        found = families.family_of(family.tested_model)
        # ResNet-D's names are ResNets': the facts are the same family's.
        assert found is family or (not family.prefixes and found.densify_norm == family.densify_norm)
    with pytest.raises(UsageError, match=r"unknown model 'vit_base_patch16_224'.*ConvNeXt V2 \(e.g. convnextv2_atto\)"):
        families.family_of("vit_base_patch16_224")


def test_model_configs_leave_the_drop_path_to_the_table():
    for option in MODEL_CONFIGS:
        node = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{option}.yaml")
        assert node.drop_path_rate is None, f"conf/model/{option}.yaml states its own drop path"
