"""Bad shard settings are found by the start-up checks, before any model (even the checks' ``meta`` one) is built:
the model builder is made to fail, and the shard error must still be the one that arrives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from sparkme.cli import CONFIG_DIR
from sparkme.data.shards.checks import check_shards
from sparkme.data.shards.writer import write_shards
from sparkme.engine.pretrain import pretrain
from sparkme.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 images in 3 shards of 5, 5 and 2."""
    folder, out = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("shards")
    for index in range(12):
        Image.new("RGB", (16, 16), (index, 100, 0)).save(folder / f"{index}.png")
    write_shards(folder, out, per_shard=5)
    return out


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["debug=fast", "data=shards", *overrides])


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (``sparkme.models.build_spark``, hydra's target for every 2-D model) fails the test."""
    def build_spark(*args, **kwargs):
        raise AssertionError("a model was built before the shard settings were checked")

    monkeypatch.setattr("sparkme.models.build_spark", build_spark)


def _not_a_tar(shards: Path) -> str:
    broken = shards.parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "x.tar").write_bytes(b"\x00garbage" * 100)
    return str(broken / "x.tar")


CASES = {
    "pattern matching nothing": (lambda s: str(s / "nothing-*.tar"), [], "matches no file"),
    "missing shard": (lambda s: str(s / "train-{000000..000003}.tar"), [], "train-000003.tar' does not exist"),
    "not a tar": (_not_a_tar, [], "is not a readable tar file"),
    "pipe without manifest": (lambda s: f"pipe:cat {s}/train-000000.tar", [], "pipe: shards need data.manifest"),
    "too many workers": (lambda s: str(s / "train-{000000..000002}.tar"), ["data.num_workers=4"],
                         "data.num_workers=4 is more than the 3 batch"),  # 12 images / 2 ranks / batch 2: 3
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_shard_setting_stops_the_run_before_the_model_is_built(shards, tmp_path, monkeypatch, no_model, case):
    urls, extra, message = CASES[case]
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _compose([f"data.urls='{urls(shards)}'", f"run_dir={tmp_path}", *extra])
    with pytest.raises(UsageError, match=message):
        pretrain(cfg)


def test_good_shards_pass_the_check_and_the_worker_count_follows_the_world_size(shards, monkeypatch):
    cfg = _compose([f"data.urls='{shards}/train-{{000000..000002}}.tar'", "data.num_workers=4"])
    check_shards(cfg)  # one rank: 6 batches of 2 for 4 workers
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="3 batch"):
        check_shards(cfg)
    check_shards(_compose(["data=imagefolder", "data.root=/nowhere"]))  # other data: not this check's business


@pytest.mark.slow
def test_too_many_workers_end_sparkme_pretrain_in_one_line_with_status_2(shards, tmp_path):
    urls = f"{shards}/train-{{000000..000002}}.tar"
    done = subprocess.run([sys.executable, "-m", "sparkme.cli", "debug=fast", "data=shards", f"data.urls='{urls}'",
                           "data.num_workers=4", f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, WORLD_SIZE="2"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "sparkme-pretrain: error: data.num_workers=4 is more than the 3 batch(es) each of the 2 rank(s) reads per "
        "epoch from 12 samples in 3 shard(s): some workers would get nothing; lower data.num_workers or "
        "trainer.batch_size"]
