"""kNN monitor of pretraining: the kNN top-1 of the SparK encoder's features on a fixed labelled subset.

>>> monitor = KnnMonitor.from_folder("data/labelled", image_size=224, seed=0)
>>> monitor.evaluate(spark.encoder)          # {"knn_top1": 41.2, "knn_top5": 70.3}

The encoder runs with every patch visible (``mask=None``), in eval mode (BatchNorm's running statistics), and its
stride-32 map is averaged over space: the features ``sparkme-probe`` takes from the dense model, without exporting
it. The subset is chosen once by ``seed`` (``per_class`` training and ``val_per_class`` validation images of each
class), so the cost of one evaluation is fixed and the figure depends on the weights only: a resumed run logs the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sparkme.data.labelled import LabelledImages, check_labelled_root, labelled_splits
from sparkme.evaluation.features import probe_transform
from sparkme.evaluation.knn import TEMPERATURE, K, knn_accuracy


def balanced_subset(labels: list[int], per_class: int, seed: int) -> list[int]:
    """Up to ``per_class`` indices of each class, chosen by ``seed``; sorted."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    chosen: list[int] = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    return sorted(chosen)


class KnnMonitor:
    """kNN top-1 / top-5 of an encoder's pooled last-stage features, training subset against validation subset.

    Args:
        train: ``(image, label)`` dataset whose features are the neighbours.
        val: ``(image, label)`` dataset whose features are classified.
        num_classes: labels are in ``[0, num_classes)``.
        k, temperature: the kNN's (``sparkme.evaluation.knn``).
        batch_size: images per encoder forward.
    """

    def __init__(self, train, val, num_classes: int, k: int = K, temperature: float = TEMPERATURE,
                 batch_size: int = 64):
        self.train, self.val = train, val
        self.num_classes, self.k, self.temperature, self.batch_size = num_classes, k, temperature, batch_size

    @classmethod
    def from_folder(cls, root: str, image_size: int, seed: int = 0, per_class: int = 20, val_per_class: int = 10,
                    val_fraction: float | None = None, **kwargs) -> KnnMonitor:
        """The monitor of a labelled folder (``sparkme.data.labelled``): a class-balanced subset of each split.

        Raises:
            UsageError: a bad folder (one line, at start-up).
        """
        layout = check_labelled_root(root, val_fraction)
        transform = probe_transform(image_size)
        train, val, classes = labelled_splits(layout, transform, transform, seed)
        return cls(_subset(train, per_class, seed), _subset(val, val_per_class, seed + 1), len(classes), **kwargs)

    @property
    def cost(self) -> int:
        """Images encoded per evaluation."""
        return len(self.train) + len(self.val)

    @torch.no_grad()
    def features(self, encoder: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, C)`` pooled stride-32 features of the encoder with every patch visible, and ``(N,)`` labels."""
        device = next(encoder.parameters()).device
        features, labels = [], []
        # An explicit generator: creating the loader's iterator must not draw from the training run's global RNG.
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, generator=torch.Generator())
        for images, targets in loader:
            maps = encoder(images.to(device))  # 4 maps (B, C_i, H/s, W/s); mask=None: every patch visible
            features.append(maps[-1].float().mean(dim=(2, 3)).cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long))
        return torch.cat(features), torch.cat(labels)

    def evaluate(self, encoder: nn.Module) -> dict[str, float]:
        """``{"knn_top1": %, "knn_top5": %}``; the encoder is in eval mode meanwhile and its mode restored."""
        was_training = encoder.training
        encoder.eval()
        try:
            train_x, train_y = self.features(encoder, self.train)
            val_x, val_y = self.features(encoder, self.val)
        finally:
            encoder.train(was_training)
        accuracy = knn_accuracy(train_x, train_y, val_x, val_y, self.num_classes, self.k, self.temperature)
        return {"knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"]}


def _subset(dataset: LabelledImages, per_class: int, seed: int) -> Subset:
    return Subset(dataset, balanced_subset(dataset.targets, per_class, seed))
