"""``sparkme-probe knn.bank_dtype=float16``: the features are extracted, cached and held as float16 (half the memory
of an ImageNet-size bank), the kNN on them is the kNN of the float32 features rounded to float16, the linear probe
reads them too, and a bad value ends in one line at start-up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkme.evaluation import cli
from sparkme.evaluation.knn import knn_accuracy
from sparkme.files import read_torch_file


def _folder(root: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.mark.slow
def test_a_float16_bank_is_stored_half_size_and_gives_the_knn_of_the_rounded_features(tmp_path):
    argv = ["model=resnet18", "init=null", f"data.root={_folder(tmp_path / 'data')}", "data.val_fraction=0.34",
            "image_size=32", "num_workers=0", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'probe.json'}",
            "linear.epochs=2", "linear.warmup_epochs=1", "knn.k=5"]
    full = cli.run(argv)
    half = cli.run([*argv, "knn.bank_dtype=float16"])
    assert half["features_file"] != full["features_file"] and not half["features_cached"]
    stored = read_torch_file(Path(half["features_file"]), "features")
    reference = read_torch_file(Path(full["features_file"]), "features")
    assert stored["train_features"].dtype == torch.float16 and stored["val_features"].dtype == torch.float16
    assert reference["train_features"].dtype == torch.float32
    assert torch.equal(stored["train_features"], reference["train_features"].half())
    rounded = knn_accuracy(reference["train_features"].half(), reference["train_labels"],
                           reference["val_features"].half(), reference["val_labels"], 3, k=5)
    assert (half["knn_top1"], half["knn_top5"]) == (rounded["top1"], rounded["top5"])
    assert 0 <= half["linear_top1"] <= 100
    assert cli.run([*argv, "knn.bank_dtype=float16"])["features_cached"]  # the float16 file is its own cache entry


@pytest.mark.parametrize("value", ["bfloat16", "fp16"])
def test_a_bad_bank_dtype_ends_in_one_line_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["model=resnet18", f"data.root={_folder(tmp_path / 'data', 2)}", "data.val_fraction=0.5",
                  f"knn.bank_dtype={value}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sparkme-probe: error: knn.bank_dtype must be one of float32, float16, got '{value}'"]
