"""A built wheel is a complete install: installed without ``-e`` into a throw-away folder, its commands run from an
unrelated directory (configs included as package data, the MinkowskiEngine installer included)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(folder the wheel was installed into, environment that puts it first on the path)."""
    root = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", WANDB_MODE="disabled")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist",
          REPO], cwd=root, env=env)
    wheel = next((root / "dist").glob("sparkme-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    conf = {Path(*Path(n).parts[2:]).as_posix() for n in names if n.startswith("sparkme/conf/")}
    assert {"config.yaml", "model/resnet18.yaml", "backend/minkowski.yaml", "debug/fast.yaml"} <= conf, names
    assert "sparkme/install/minkowski_patches.py" in names
    site = root / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], cwd=root, env=env)
    env["PYTHONPATH"] = str(site)
    return site, env


def test_the_wheel_install_is_the_one_imported(installed, tmp_path):
    site, env = installed
    out = _run([sys.executable, "-c", "import sparkme; print(sparkme.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(out.strip()).is_relative_to(site)


def test_pretrain_then_export_run_from_an_unrelated_directory(installed, tmp_path):
    site, env = installed
    run_dir = tmp_path / "run"
    _run([site / "bin" / "sparkme-pretrain", "debug=fast", "backend=torch", f"run_dir={run_dir}"], cwd=tmp_path,
         env=env)
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    assert checkpoint.is_file()
    _run([site / "bin" / "sparkme-export", f"ckpt={checkpoint}", "format=timm", f"out={tmp_path / 'r18.pt'}"],
         cwd=tmp_path, env=env)
    assert (tmp_path / "r18.pt").stat().st_size > 0


@pytest.mark.parametrize("command", ["sparkme-bench", "sparkme-install-minkowski"])
def test_the_other_commands_start(installed, tmp_path, command):
    site, env = installed
    assert "usage" in _run([site / "bin" / command, "--help"], cwd=tmp_path, env=env).stdout
