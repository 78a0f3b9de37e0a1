"""The kNN monitor of pretraining: the SparK encoder with every patch visible gives the dense model's probe
features, the subset is class-balanced and fixed by the seed, and the figure depends on the weights only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparkme.evaluation.features import PooledEncoder
from sparkme.evaluation.monitor import KnnMonitor, balanced_subset
from sparkme.models.spark import build_spark


def _folder(root: Path, per_class: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / name / f"{index}.png")
    return root


def test_balanced_subset_is_fixed_by_the_seed():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    chosen = balanced_subset(labels, 4, seed=5)
    assert [sum(labels[i] == c for i in chosen) for c in range(3)] == [4, 3, 4]
    assert balanced_subset(labels, 4, seed=5) == chosen != balanced_subset(labels, 4, seed=6)


def test_monitor_features_equal_the_dense_models_and_depend_on_weights_only(tmp_path):
    root = _folder(tmp_path / "data", per_class=4)
    torch.manual_seed(0)
    spark = build_spark("resnet18", backend="torch", decoder_width=32).train()
    monitor = KnnMonitor.from_folder(str(root), image_size=64, per_class=3, val_per_class=2, k=5)
    assert (len(monitor.train), len(monitor.val), monitor.cost) == (9, 6, 15)
    sparse, labels = monitor.features(spark.encoder.eval(), monitor.train)
    dense = PooledEncoder(spark.encoder.to_dense()).eval()
    images = torch.stack([monitor.train[i][0] for i in range(len(monitor.train))])
    with torch.no_grad():
        assert torch.allclose(sparse, dense(images), atol=1e-4, rtol=1e-4)
    assert labels.tolist() == [monitor.train[i][1] for i in range(len(monitor.train))]
    spark.encoder.train()
    first = monitor.evaluate(spark.encoder)
    assert spark.encoder.training and 0 <= first["knn_top1"] <= 100
    again = KnnMonitor.from_folder(str(root), image_size=64, per_class=3, val_per_class=2, k=5)
    assert again.evaluate(spark.encoder) == first
