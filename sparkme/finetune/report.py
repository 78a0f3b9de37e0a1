"""What a fine-tune reports about its classifier: top-k accuracy, a per-class table and a confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many of ``labels`` ``(N,)`` are among the ``k`` highest of ``logits`` ``(N, C)``, for each k (k is capped
    at C: with fewer than 5 classes top-5 is 100 %)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` counts: row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_table(matrix: torch.Tensor, classes: list[str]) -> str:
    """A plain-text table: class, images, correct, accuracy."""
    width = max(len("class"), *(len(name) for name in classes))
    lines = [f"{'class':<{width}}  images  correct  accuracy"]
    for index, name in enumerate(classes):
        total, correct = int(matrix[index].sum()), int(matrix[index, index])
        accuracy = f"{100 * correct / total:7.2f} %" if total else "      - "
        lines.append(f"{name:<{width}}  {total:6d}  {correct:7d}  {accuracy}")
    return "\n".join(lines) + "\n"


def save_confusion_png(matrix: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    """The confusion matrix as a picture (rows normalised to the true class's images; counts written when few)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(max(4.5, 2 + 0.4 * len(classes)), 20)  # room for the title with few classes
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    axes.set_yticks(range(len(classes)), classes, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    if len(classes) <= 20:
        for row in range(len(classes)):
            for column in range(len(classes)):
                if matrix[row, column]:
                    axes.text(column, row, int(matrix[row, column]), ha="center", va="center", fontsize=7,
                              color="white" if rates[row, column] > 0.5 else "black")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
