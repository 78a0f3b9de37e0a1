"""Every ``key=value`` override written in the documentation is accepted by the config of the command it targets.

* **Commands** in the fenced ``bash`` blocks of README.md and docs/**/*.md (skipped blocks included: a GPU-only or
  SLURM-only command must still name real settings): ``sparkme-pretrain`` (also ``python -m sparkme.cli`` and
  ``torchrun ... -m sparkme.cli``) is composed with hydra from ``conf/config.yaml``, ``sparkme-finetune`` from
  ``conf/finetune/config.yaml``, ``sparkme-probe`` is merged into ``conf/probe.yaml`` as the command does. Hydra's
  own settings (``hydra.*``, ``hydra/...``) and values that the shell fills in (``$VAR``) are left to hydra and the
  shell; a sweep (``backend=minkowski,torch``) is checked one value at a time.
* **Inline code** such as ``trainer.amp=bf16`` or ``data.holdout_fraction=0 data.holdout=null`` (every word of the
  span a ``key=value`` with a dotted key: plain words such as ``strict=True`` are Python arguments or other commands'
  options) names a key of the pretraining, fine-tuning or probe config.

Composition only: no model is built and nothing runs, so the whole test takes seconds.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparkme.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*```(\S*)\s*$")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
OVERRIDE = re.compile(r"^[+~]?[A-Za-z_][\w./-]*=\S*$")
PRETRAIN_ROOT = ["data.root=/images"]  # data=imagefolder's required root, when the command leaves it to the reader
FINETUNE_CONFIG_DIR = Path(CONFIG_DIR) / "finetune"
PROBE_FILE = Path(CONFIG_DIR) / "probe.yaml"
# Settings of other tools that the docs name: MMDetection / MMSegmentation configs load a backbone with
# model.pretrained=PATH (the exporting and detection guides).
FOREIGN_KEYS = {"model.pretrained"}


def _bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced bash block, continuation lines joined, comments dropped."""
    lines, out, block, start = path.read_text().splitlines(), [], None, 0
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence:
            block = [] if block is None and fence.group(1) == "bash" else None
            if block is not None:
                start = number + 1
            continue
        if block is not None:
            block.append(line)
            if not line.rstrip().endswith("\\"):
                text = " ".join(part.rstrip("\\").strip() for part in block)
                out.append((start, text.split(" #", 1)[0].strip()))
                block, start = [], number + 1
    return out


def _commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """(where, command, overrides) of every sparkme command with hydra-style arguments in ``path``."""
    found = []
    for line, text in _bash_lines(path):
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            continue
        for segment in _segments(words):
            command, args = _command_of(segment)
            if command:
                overrides = [w for w in args if OVERRIDE.match(w)]
                found.append((f"{path.relative_to(REPO)}:{line}", command, overrides))
    return found


def _segments(words: list[str]) -> list[list[str]]:
    segments, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|", "&"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    return [*segments, current]


def _command_of(words: list[str]) -> tuple[str | None, list[str]]:
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # environment assignments
        words = words[1:]
    if words[:1] == ["srun"]:
        words = words[1:]
    if not words:
        return None, []
    name = Path(words[0]).name
    if name in ("sparkme-pretrain", "sparkme-finetune", "sparkme-probe"):
        return name, words[1:]
    if "-m" in words and "sparkme.cli" in words and name in ("python", "python3", "torchrun"):
        return "sparkme-pretrain", words[words.index("sparkme.cli") + 1:]
    if name.endswith("demo.sh"):
        return "sparkme-pretrain", ["experiment=demo", *words[1:]]
    return None, []


def _checkable(overrides: list[str]) -> list[str]:
    """Hydra's own settings and shell-filled values left out; a sweep's first value kept."""
    kept = []
    for word in overrides:
        key, value = word.split("=", 1)
        if key.lstrip("+~").startswith(("hydra.", "hydra/")) or "$" in value:
            continue
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        kept.append(f"{key}={re.sub(r'^~(?=/|$)', '/home/user', value)}")  # the shell expands ~ before hydra
    return kept


def _compose_pretrain(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg


def _accepts(command: str, overrides: list[str]) -> None:
    """Raise when the command's config refuses ``overrides``."""
    if command == "sparkme-pretrain":
        cfg = _compose_pretrain(overrides)
        OmegaConf.to_container(cfg, resolve=False)
    elif command == "sparkme-finetune":
        with initialize_config_dir(config_dir=str(FINETUNE_CONFIG_DIR), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    else:
        base = OmegaConf.load(PROBE_FILE)
        OmegaConf.set_struct(base, True)
        OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))


COMMANDS = [c for path in DOC_FILES for c in _commands(path)]


def test_the_docs_hold_commands_to_check():
    kinds = {command for _, command, _ in COMMANDS}
    assert kinds == {"sparkme-pretrain", "sparkme-finetune", "sparkme-probe"}, kinds
    assert len(COMMANDS) > 25


@pytest.mark.parametrize("where, command, overrides", COMMANDS, ids=[f"{w} {c}" for w, c, _ in COMMANDS])
def test_every_documented_command_names_real_settings(where, command, overrides):
    overrides = _checkable(overrides)
    try:
        _accepts(command, overrides)
    except Exception as error:  # noqa: BLE001 - the message says which override failed
        if command == "sparkme-pretrain" and "data.root" in str(error) and not any(
                o.startswith("data.root=") for o in overrides):
            _accepts(command, overrides + PRETRAIN_ROOT)
            return
        pytest.fail(f"{where}: {command} {' '.join(overrides)}\nrefused: {str(error).splitlines()[0]}")


@lru_cache(maxsize=1)
def _known_keys() -> set[str]:
    """Every dotted key of the pretraining (every data option), fine-tuning and probe configs."""
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            keys.add(name)
            if isinstance(value, dict):
                walk(value, name + ".")

    data_options = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))
    pretrain = [_compose_pretrain([f"data={option}", *(PRETRAIN_ROOT if option == "imagefolder" else [])])
                for option in data_options]
    for container in [*map(OmegaConf.to_container, pretrain), OmegaConf.to_container(OmegaConf.load(PROBE_FILE))]:
        walk(container, "")
    with initialize_config_dir(config_dir=str(FINETUNE_CONFIG_DIR), version_base="1.3"):
        walk(OmegaConf.to_container(compose(config_name="config")), "")
    for option in Path(CONFIG_DIR).glob("*/**/*.yaml"):  # every option of every group (e.g. a 3-D model's keys)
        group = option.relative_to(CONFIG_DIR).parts[0]
        if group not in ("finetune", "hydra") and "@package _global_" not in option.read_text():
            walk(OmegaConf.to_container(OmegaConf.load(option)), f"{group}.")
    return keys | FOREIGN_KEYS


def _inline_overrides(path: Path) -> list[tuple[str, str]]:
    found, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for span in INLINE.findall(line):
            words = span.split()
            if words and all(OVERRIDE.match(w) for w in words):
                found += [(f"{path.relative_to(REPO)}:{number}", w) for w in words]
    return found


INLINE_OVERRIDES = [item for path in DOC_FILES for item in _inline_overrides(path)]


def test_every_inline_override_names_a_real_key():
    keys = _known_keys()
    unknown = []
    for where, word in INLINE_OVERRIDES:
        key = word.split("=", 1)[0].lstrip("+~")
        if key.startswith(("hydra.", "hydra/")) or "." not in key or "==" in word:
            continue
        if key not in keys:
            unknown.append(f"{where}: {word}")
    assert sum("." in word.split("=", 1)[0] for _, word in INLINE_OVERRIDES) > 20
    assert not unknown, "inline overrides naming no setting:\n" + "\n".join(unknown)
