"""Evaluation of a frozen encoder: features (``features``), a weighted kNN classifier (``knn``), MAE's linear probe
(``linear_probe``), the ``sparkme-probe`` command (``cli``) and the kNN monitor of pretraining (``monitor``)."""

from sparkme.evaluation.knn import knn_accuracy, knn_scores
from sparkme.evaluation.linear_probe import LinearProbeSettings, linear_probe

__all__ = ["LinearProbeSettings", "knn_accuracy", "knn_scores", "linear_probe"]
