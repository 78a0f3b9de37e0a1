"""The hydra commands as a user types them: hydra's flags (``--cfg``, ``--resolve``, ``--info``, ``--help``, ``-m``)
in any order around the overrides, ``debug=fast`` that wins over the config's own values, and nothing written
outside ``run_dir``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_finetune import make_labelled_folder

from sparkme import cli as pretrain_cli
from sparkme.evaluation import cli as probe_cli
from sparkme.finetune import cli as finetune_cli
from sparkme.hydra_argv import hydra_argv, split_flags

BIN = Path(sys.executable).parent
COMMANDS = {"sparkme-pretrain": (pretrain_cli, ["model=resnet50", "data=imagefolder", "data.root=/nowhere"]),
            "sparkme-finetune": (finetune_cli, ["model=resnet50", "data.root=/nowhere"]),
            "sparkme-probe": (probe_cli, ["model=resnet50", "data.root=/nowhere"])}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("labelled"), per_class=(4, 2), size=32)


def run_main(module, argv: list[str], capsys) -> tuple[int, str, str]:
    """``module.main()`` in this process with ``argv``: ``(exit status, stdout, stderr)``."""
    saved = sys.argv
    sys.argv = [module.COMMAND, *argv]
    try:
        module.main()
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flags_move_behind_the_overrides_with_their_values():
    argv = ["--info", "defaults", "a=1", "-c", "job", "--resolve", "b=2", "--info", "-m", "c=3", "--cfg=hydra"]
    assert split_flags(argv) == (["a=1", "b=2", "c=3"],
                                 ["--info", "defaults", "-c", "job", "--resolve", "--info", "-m", "--cfg=hydra"])
    assert split_flags(["--info", "model=x"]) == (["model=x"], ["--info"])  # not a value of --info
    arranged = hydra_argv(["--cfg", "job", "run_dir=/r", "x=1", "-m"])
    assert arranged[:2] == ["run_dir=/r", "x=1"] and arranged[-3:] == ["--cfg", "job", "-m"]
    assert {"hydra.output_subdir=null", "hydra.run.dir=${run_dir}", "hydra.sweep.dir=${run_dir}"} <= set(arranged)
    assert not any(arg.startswith("hydra.run.dir") for arg in hydra_argv(["x=1"]))


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("order", ["flags_last", "flags_first"])
def test_cfg_and_resolve_in_any_order(command, order, capsys):
    module, overrides = COMMANDS[command]
    for flags, resolved in ((["--cfg", "job"], False), (["--cfg", "job", "--resolve"], True)):
        argv = [*overrides, *flags] if order == "flags_last" else [*flags, *overrides]
        code, out, err = run_main(module, argv, capsys)
        assert code == 0, err
        printed = yaml.safe_load(out)
        assert "resnet50" in str(printed["model"]) and printed["data"]["root"] == "/nowhere" and "hydra" not in printed
        if "name" in printed:  # an interpolation (the probe's config has none)
            assert ("${" not in str(printed["name"])) == resolved, printed["name"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_info_in_any_order(command, capsys):
    module, overrides = COMMANDS[command]
    for argv in ([*overrides, "--info", "defaults"], ["--info", "defaults", *overrides], [*overrides, "--info"]):
        code, out, err = run_main(module, argv, capsys)
        assert code == 0, err
        assert "Defaults List" in out, out[-2000:]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_the_command_its_groups_and_the_settings_changed_most(command, capsys):
    module, overrides = COMMANDS[command]
    code, out, err = run_main(module, [*overrides, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"{command}: ") and "powered by Hydra" not in out
    if command != "sparkme-probe":  # the probe's config has no groups
        groups = out.split("Config groups (group=option):")[1].split("The settings changed most")[0]
        assert "debug: fast" in groups and "finetune" not in groups and "hydra" not in groups
    settings = out.split("The settings changed most:")[1].split("Flags")[0].strip().splitlines()
    assert len(settings) == 3 and any("data.root=" in line for line in settings)
    if command == "sparkme-pretrain":
        assert "model: " in out and "backend: masked, minkowski, torch" in out


@pytest.mark.slow
def test_multirun_with_the_flag_after_the_overrides(labelled, tmp_path, capsys):
    """``-m`` last (hydra's parser alone refuses an override before it when the command adds its own); a sweep of
    one job keeps it short: ``-m`` itself is what is tested."""
    argv = ["debug=fast", "model=resnet18", f"data.root={labelled}", "trainer.max_steps=1", "export_formats=[]",
            "seed=3", f"hydra.sweep.dir={tmp_path}", "-m"]
    code, _, err = run_main(finetune_cli, argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0_finetune_resnet18", "multirun.yaml"]
    assert (tmp_path / "0_finetune_resnet18" / "checkpoints" / "latest.pt").exists()


@pytest.mark.parametrize("config_dir", [pretrain_cli.CONFIG_DIR, finetune_cli.FINETUNE_CONFIG_DIR],
                         ids=["sparkme-pretrain", "sparkme-finetune"])
def test_debug_fast_wins_over_the_config_s_own_values(config_dir):
    """Every value of ``debug/fast.yaml`` is the composed one (the config's ``_self_`` comes before ``debug``)."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["debug=fast"])
    fast = yaml.safe_load((config_dir / "debug" / "fast.yaml").read_text())

    def leaves(node: dict, prefix: str = ""):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]

    checked = dict(leaves(fast))
    assert "trainer.max_steps" in checked and len(checked) >= 8
    for key, value in checked.items():
        assert OmegaConf.select(cfg, key) == value, key


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "run" not in p.relative_to(folder).parts)


@pytest.mark.slow
def test_nothing_is_written_outside_run_dir(labelled, tmp_path):
    """A fine-tune, and a pretraining run refused at start-up (after hydra has made its folders), create nothing in
    the working folder but their ``run_dir`` (hydra made ``runs/<name>`` there)."""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    commands = [
        ["sparkme-finetune", "debug=fast", "model=resnet18", f"data.root={labelled}", "trainer.max_steps=1",
         "run_dir=run/finetune"],
        ["sparkme-pretrain", "debug=fast", "backend=torch", "data=imagefolder", "data.root=nowhere",
         "run_dir=run/refused"],
    ]
    for command, *args in commands:
        result = subprocess.run([str(BIN / command), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == (2 if "refused" in args[-1] else 0), result.stderr[-3000:]
    assert _listing(tmp_path) == []
    assert (tmp_path / "run" / "finetune" / "checkpoints" / "latest.pt").exists()
    assert (tmp_path / "run" / "finetune" / ".hydra" / "config.yaml").exists()
