"""``--help`` of a sparkme hydra command: what the command does, its config groups and options, the settings users
change most, and how to see every setting (hydra's own ``--help`` would introduce the script's module name, "cli is
powered by Hydra", and list another command's config folder as a group)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CommandHelp:
    """The words of one command's ``--help``.

    Attributes:
        command: ``sparkme-<cmd>``.
        summary: one sentence: what it does, and its guide.
        settings: the three settings changed most, as ``(key=VALUE, what it means)``.
        sweep: an example of ``-m`` (several runs).
    """

    command: str
    summary: str
    settings: tuple[tuple[str, str], ...]
    sweep: str


def config_groups(config_dir: Path | None) -> dict[str, list[str]]:
    """The config groups of ``config_dir`` and their options: its sub-folders of ``*.yaml`` files, without hydra's
    own and without another command's config folder (one holding a ``config.yaml``)."""
    if config_dir is None:
        return {}
    groups = {}
    for folder in sorted(p for p in config_dir.iterdir() if p.is_dir()):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if options and folder.name != "hydra" and "config" not in options:
            groups[folder.name] = options
    return groups


def render_help(text: CommandHelp, config_dir: Path | None) -> str:
    """The ``--help`` page of a command whose config is in ``config_dir`` (None: no config groups)."""
    groups = config_groups(config_dir)
    group_usage = " [group=option ...]" if groups else ""
    lines = [f"{text.command}: {text.summary}", "",
             f"Usage: {text.command}{group_usage} [key=value ...] [--cfg job|hydra|all [--resolve]] [--info] [-m]",
             "  Arguments and flags go in any order.", ""]
    if groups:
        lines += ["Config groups (group=option):"]
        lines += [f"  {name}: {', '.join(options)}" for name, options in groups.items()]
        lines += [""]
    width = max(len(key) for key, _ in text.settings)
    lines += ["The settings changed most:"]
    lines += [f"  {key.ljust(width)}  {meaning}" for key, meaning in text.settings]
    lines += ["", "Flags (hydra's):",
              f"  --cfg job [--resolve]   print the settings this run would use ({text.command} ARGS --cfg job)",
              "  --info [defaults|...]   how the config was composed",
              f"  -m                      several runs, one per value: {text.command} -m {text.sweep}",
              "  --hydra-help            hydra's own help"]
    return "\n".join(lines)
