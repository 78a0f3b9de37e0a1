"""A hydra command's ``key=value`` overrides checked before hydra runs: a key the config does not have
(``eval.k=20``) or a value hydra cannot parse is a user error in one line, not hydra's five-line message with exit
status 1."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparkme.errors import UsageError

_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'")


def _is_hydra_key(arg: str) -> bool:
    key = arg.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _one_value_each(overrides: list[str]) -> list[str]:
    """The overrides with each sweep (``a=1,2``, ``choice(...)``, ``range(...)``) replaced by its first value, so one
    composition checks the keys of every job; hydra's own settings are left to hydra."""
    try:
        parsed = OverridesParser.create().parse_overrides([arg for arg in overrides if not _is_hydra_key(arg)])
    except HydraException as error:
        raise UsageError(f"cannot read the argument: {' '.join(str(error).split())}") from error
    firsts = []
    for override in parsed:
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            firsts.append(override.input_line if first is None else f"{override.get_key_element()}={first}")
        else:
            firsts.append(override.input_line)
    return firsts


def _settings_under(base: DictConfig, key: str) -> tuple[str, list[str]]:
    """The deepest existing node on the way to ``key`` and the settings it has."""
    parts = key.split(".")[:-1]
    while parts and not isinstance(OmegaConf.select(base, ".".join(parts)), DictConfig):
        parts.pop()
    node = OmegaConf.select(base, ".".join(parts)) if parts else base
    return ".".join(parts) or "the config", sorted(str(k) for k in node.keys() if k != "hydra")


def check_overrides(config_name: str, overrides: list[str], config_dir: Path | None = None) -> None:
    """Compose ``config_name`` (from ``config_dir``, or from hydra's ConfigStore when None) with ``overrides``.

    Raises:
        UsageError: an unknown key (naming the settings that exist where it points), or an override hydra refuses.
    """
    checked = _one_value_each(overrides)

    def composed(with_overrides: list[str]) -> DictConfig:
        context = (initialize(version_base="1.3", config_path=None) if config_dir is None
                   else initialize_config_dir(config_dir=str(config_dir), version_base="1.3"))
        with context:
            return compose(config_name=config_name, overrides=with_overrides)

    try:
        composed(checked)
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).split())
        unknown = _UNKNOWN_KEY.search(message)
        if unknown is None:
            raise UsageError(f"bad argument: {message}") from error
        key = unknown.group(1)
        arg = next((a for a in overrides if a.lstrip("+~").split("=", 1)[0] == key), key)
        group_changes = [a for a in checked if "=" in a and "." not in a.split("=", 1)[0]
                         and a.lstrip("+~").split("=", 1)[0] != key]
        try:
            base = composed(group_changes)
        except (HydraException, OmegaConfBaseException):
            base = composed([])
        where, names = _settings_under(base, key)
        raise UsageError(f"unknown setting {key!r} in {arg!r}: {where} has {', '.join(names)} "
                         f"(every setting: --cfg job; +{key}=... adds a new one)") from error
