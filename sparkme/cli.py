"""``sparkme-pretrain``: the hydra entry point; all the work is in ``sparkme.engine.pretrain.pretrain``.

User errors (a config group option or a setting that does not exist, a bad value, a missing file) end in one line,
``sparkme-pretrain: error: ...``, with exit status 2; anything else is a bug and keeps its traceback. Hydra's own
flags (``--cfg job``, ``--resolve``, ``--info``, ``--help``, ``-m``) go anywhere on the line (``sparkme.hydra_argv``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from sparkme.engine.core import check_writable
from sparkme.engine.lost_rank import RankLostError, exit_with_rank_lost
from sparkme.engine.pretrain import pretrain
from sparkme.errors import UsageError, exit_with_usage_error, run_reporting_usage_errors
from sparkme.hydra_argv import hydra_argv, split_flags, value_of
from sparkme.hydra_help import CommandHelp, render_help
from sparkme.hydra_output import hold_hydra_output
from sparkme.override_check import check_overrides

COMMAND = "sparkme-pretrain"
HELP = CommandHelp(COMMAND, "SparK masked-image-modeling pretraining of a ConvNet encoder (docs/pretraining.md).",
                   (("data=imagefolder data.root=FOLDER", "your own images (any tree of image files)"),
                    ("model=NAME", "the encoder: a file of conf/model/ (resnet50, convnext_small, ...)"),
                    ("trainer.epochs=N", "how long to train (trainer.max_steps=N: N steps)")),
                   "backend=torch,masked")
# sparkme/conf is a link to the checkout's top-level conf/ (the single source); a wheel carries the files themselves
CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Refuse ``group=option`` overrides (``model=resnet5``, ``backend=minkowsky``, sweeps included) whose option
    has no file in ``conf/<group>/``, before hydra composes anything.

    Raises:
        UsageError: naming the group, the unknown option and the options that exist.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = config_dir / key.lstrip("+~")
        # hydra's sweep functions (choice(...), glob(...)) and interpolations are left to hydra itself
        if "." in key or "/" in key or not group.is_dir() or value in ("", "null") or any(c in value for c in "()[]${"):
            continue
        # options in sub-folders too (model=volumes/resenc_l is conf/model/volumes/resenc_l.yaml)
        choices = sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))
        for option in value.split(","):
            if option not in choices:
                raise UsageError(f"unknown {key.lstrip('+~')} {option!r}; choose one of {', '.join(choices)} "
                                 f"(files in conf/{group.name}/)")


def run_task(command: str, cfg: DictConfig, task: Callable[..., dict]) -> None:
    """The body of a sparkme hydra command: ``run_dir`` defaults to hydra's output folder, hydra's records wait for
    the run lock (``task(cfg, on_hold=...)`` calls back once it holds the folder), a user error or a lost rank ends
    in one line (hydra would wrap it in its own traceback), and rank 0 prints the summary as JSON."""
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    write_after_lock = hold_hydra_output(cfg)

    def run_and_report() -> None:
        try:
            summary = task(cfg, on_hold=write_after_lock)
        except RankLostError as error:  # one line, not the transport's error inside hydra's traceback
            exit_with_rank_lost(command, error)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=2))

    run_reporting_usage_errors(command, run_and_report)


def check_run_dir(overrides: list[str]) -> None:
    """A ``run_dir=`` given as a plain path is writable: hydra makes its output folder there before the task starts
    (``sparkme.hydra_argv``), so an unwritable one must be refused first, in one line."""
    run_dir = value_of(overrides, "run_dir")
    if run_dir in (None, "", "null") or any(c in run_dir for c in "${,()'\""):
        return
    try:
        check_writable(Path(run_dir))
    except OSError as error:
        raise UsageError(str(error)) from error


# hydra flags that print and run nothing: no run directory is made for them
_PRINT_ONLY = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")
# hydra flags after which the overrides are not checked first: they only print, or they compose another config
_NO_PRECHECK = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--config-name", "-cn",
                "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun")


def launch(command: CommandHelp, hydra_main: Callable[[], None], config_dir: Path | None = CONFIG_DIR,
           config_name: str = "config") -> None:
    """Print ``--help``; check the arguments (unknown ``group=option`` or setting: one line, exit 2); keep hydra
    from writing before the run lock is held and outside ``run_dir``; put hydra's flags where its parser takes them
    (any order on the command line); start ``hydra_main``. ``config_dir`` None: the config is in hydra's
    ConfigStore."""
    overrides, flags = split_flags(sys.argv[1:])
    if any(flag in ("--help", "-h") for flag in flags):
        print(render_help(command, config_dir))
        sys.exit(0)
    try:
        if config_dir is not None:
            check_group_choices(overrides, config_dir)
        if not any(flag.split("=", 1)[0] in _NO_PRECHECK for flag in flags):
            check_overrides(config_name, overrides, config_dir)
        if not any(flag.split("=", 1)[0] in _PRINT_ONLY for flag in flags):
            check_run_dir(overrides)
    except UsageError as error:
        exit_with_usage_error(command.command, error)
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_task(COMMAND, cfg, pretrain)


def main() -> None:
    launch(HELP, _hydra_main)


if __name__ == "__main__":
    main()
