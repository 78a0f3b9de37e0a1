"""The argument list a sparkme hydra command hands to hydra: hydra's own flags in any order, and the overrides the
command adds itself.

Hydra parses its command line with ``argparse``, whose ``overrides`` are one run of positional arguments: an override
after a flag (``sparkme-pretrain --cfg job model=resnet50``, or the command's own overrides appended after a user's
``--cfg job``) ends in ``unrecognized arguments``, and ``--info model=resnet50`` takes the override for ``--info``'s
value. ``hydra_argv`` therefore puts every override first, then the command's own, then the flags with their
values, reading which flag takes a value from hydra's own parser.
"""

from __future__ import annotations

import argparse

from hydra._internal.utils import get_args_parser


def _flag_actions() -> dict[str, argparse.Action]:
    """Every option string of hydra's parser (``--cfg``, ``-c``, ``--info``, ...) and its action."""
    return {option: action for action in get_args_parser()._actions for option in action.option_strings}


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` split into ``(overrides, flags)``, each in its given order; a flag keeps its value (``--cfg job``,
    ``--info defaults``; ``--info`` alone takes none). Anything else is an override, left for hydra to judge."""
    actions = _flag_actions()
    overrides, flags = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        action = actions.get(arg.split("=", 1)[0]) if arg.startswith("-") else None
        index += 1
        if action is None:
            overrides.append(arg)
            continue
        flags.append(arg)
        if "=" in arg or action.nargs == 0 or index == len(argv):
            continue
        following = argv[index]
        optional = action.nargs == "?"
        if not optional or (following in (action.choices or ()) and following not in actions):
            flags.append(following)
            index += 1
    return overrides, flags


def given(overrides: list[str], key: str) -> bool:
    """Whether an override sets ``key`` (``key=``, ``+key=``, ``++key=``, ``~key``)."""
    return any(arg.lstrip("+~").split("=", 1)[0] == key for arg in overrides)


def value_of(overrides: list[str], key: str) -> str | None:
    """The value the last override of ``key`` gives it (None when none does)."""
    values = [arg.split("=", 1)[1] for arg in overrides if "=" in arg and arg.lstrip("+~").split("=", 1)[0] == key]
    return values[-1] if values else None


def command_overrides(overrides: list[str], multirun: bool = False) -> list[str]:
    """What a sparkme command adds to the user's overrides (each only when the user did not set it):

    - ``hydra.output_subdir=null`` and a job log opened at its first line: hydra writes nothing before the run lock
      is held (``sparkme.hydra_output``);
    - ``hydra.run.dir=${run_dir}`` when ``run_dir=`` is given (with ``-m``, ``hydra.sweep.dir=${run_dir}`` and
      ``hydra.sweep.subdir=.``): hydra's own output folder (``runs/<name>``, ``multirun/...``) is not created
      outside it.
    """
    extra = []
    if not given(overrides, "hydra.output_subdir"):
        extra.append("hydra.output_subdir=null")
    if not any(given(overrides, key) for key in ("hydra/job_logging", "hydra.job_logging",
                                                  "hydra.job_logging.handlers.file.delay")):
        extra.append("++hydra.job_logging.handlers.file.delay=true")
    run_dir = value_of(overrides, "run_dir")
    if run_dir not in (None, "", "null") and not given(overrides, "hydra.run.dir"):
        extra.append("hydra.run.dir=${run_dir}")
    swept = run_dir is not None and any(c in run_dir for c in ",(")  # a sweep over run_dir: hydra's folders
    if multirun and run_dir not in (None, "", "null") and not swept and not given(overrides, "hydra.sweep.dir"):
        extra += ["hydra.sweep.dir=${run_dir}", "hydra.sweep.subdir=."]
    return extra


def hydra_argv(argv: list[str]) -> list[str]:
    """``argv`` as hydra's parser takes it: the user's overrides, the command's own (``command_overrides``), then
    hydra's flags with their values."""
    overrides, flags = split_flags(argv)
    multirun = any(flag in ("-m", "--multirun") for flag in flags)
    return [*overrides, *command_overrides(overrides, multirun), *flags]
