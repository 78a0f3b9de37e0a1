"""Labelled image folders for fine-tuning and evaluation: ``root/train/<class>/…`` and ``root/val/<class>/…``, or one
folder of ``root/<class>/…`` split by ``val_fraction`` (seeded, class-stratified, the same on every machine).

>>> layout = check_labelled_root("data/flowers", val_fraction=None)       # start-up check: cheap, one-line errors
>>> train, val, classes = labelled_splits(layout, train_tf, eval_tf, seed=0)
>>> image, label = train[0]                                                  # (3, H, W) tensor, int in [0, C)

Classes are the sub-folders of the train split, sorted (torchvision's ``find_classes``); files are those with an
image suffix of ``sparkme.data.imagefolder`` (any depth below the class folder). Images are decoded and tolerated
when broken exactly as for pretraining (``ImageFolderDataset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from torchvision.datasets.folder import find_classes, make_dataset

from sparkme.data.imagefolder import IMAGE_SUFFIXES, ImageFolderDataset, read_rgb
from sparkme.errors import UsageError

LAYOUT_HINT = "train/<class>/... and val/<class>/..., or one folder of <class>/... with data.val_fraction=0.1"


@dataclass(frozen=True)
class LabelledLayout:
    """What ``check_labelled_root`` found.

    Attributes:
        root: the labelled folder.
        classes: class names, sorted; a label is an index into it.
        train_dir: the folder whose ``<class>/`` sub-folders are the training images (``root/train`` or ``root``).
        train: ``(path, label)`` of every training image, before any ``val_fraction`` split.
        val: ``(path, label)`` of ``root/val``; empty when the split comes from ``val_fraction``.
        val_fraction: the fraction of each class held out of ``train`` for validation; None with a val folder.
    """

    root: Path
    classes: tuple[str, ...]
    train_dir: Path
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]
    val_fraction: float | None


def _class_folders(folder: Path, what: str) -> list[str]:
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError as error:
        raise UsageError(f"data.root: {what} {str(folder)!r} has no class sub-folders; expected {LAYOUT_HINT}") \
            from error
    return classes


def _samples(folder: Path, class_to_idx: dict[str, int], what: str) -> tuple[tuple[Path, int], ...]:
    """Every image of ``folder/<class>/`` with its label; ``UsageError`` naming the classes without images."""
    samples = make_dataset(str(folder), class_to_idx, extensions=tuple(IMAGE_SUFFIXES), allow_empty=True)
    found = {label for _, label in samples}
    names = {index: name for name, index in class_to_idx.items()}
    empty = [names[i] for i in sorted(set(names) - found)]
    if empty:
        raise UsageError(f"data.root: {len(empty)} class folder(s) of {what} {str(folder)!r} hold no images "
                         f"({', '.join(empty[:4])}); accepted suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}")
    return tuple((Path(path), int(label)) for path, label in samples)


def _check_first_image(path: Path) -> None:
    try:
        read_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise UsageError(f"data.root: the first image {str(path)!r} cannot be read ({type(error).__name__}: "
                         f"{first}); the folders must hold images PIL can decode") from error


def check_labelled_root(root: str | Path, val_fraction: float | None) -> LabelledLayout:
    """Find the classes and images of a labelled folder, without decoding more than the first image.

    Args:
        root: ``train/`` + ``val/`` folders of class folders, or one folder of class folders.
        val_fraction: in (0, 1): hold out this fraction of each class when ``root`` has no ``val/`` folder;
            ignored when it has one.

    Raises:
        UsageError: root missing, no classes or only one, a class without images, val classes that train lacks,
            a missing or out-of-range ``val_fraction`` when it is needed, a first image that does not decode.
    """
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.root {str(root)!r} does not exist or is not a directory; expected {LAYOUT_HINT}")
    has_val = (root / "val").is_dir()
    train_dir = root / "train" if (root / "train").is_dir() else root
    if has_val and train_dir == root:
        raise UsageError(f"data.root {str(root)!r} has a val/ folder but no train/ folder; expected {LAYOUT_HINT}")
    if not has_val:
        if val_fraction is None:
            raise UsageError(f"data.root {str(root)!r} has no val/ folder: set data.val_fraction (e.g. 0.1) to hold "
                             f"out part of each class, or add val/<class>/...; expected {LAYOUT_HINT}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise UsageError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")
    classes = _class_folders(train_dir, "train folder")
    if len(classes) < 2:
        raise UsageError(f"data.root: {str(train_dir)!r} has {len(classes)} class folder ({', '.join(classes)}); "
                         "a classifier needs at least 2")
    class_to_idx = {name: index for index, name in enumerate(classes)}
    train = _samples(train_dir, class_to_idx, "train folder")
    if not has_val and len(train) == len(classes):  # one image per class: nothing can be held out
        raise UsageError(f"data.root: every class of {str(train_dir)!r} holds one image, too few to hold out "
                         "data.val_fraction of it; add images or a val/<class>/... folder")
    val: tuple[tuple[Path, int], ...] = ()
    if has_val:
        val_classes = _class_folders(root / "val", "val folder")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise UsageError(f"data.root: val/ has {len(unknown)} class(es) that train/ lacks "
                             f"({', '.join(unknown[:4])}); val classes must be train classes ({', '.join(classes[:8])}"
                             f"{', ...' if len(classes) > 8 else ''})")
        val = _samples(root / "val", {name: class_to_idx[name] for name in val_classes}, "val folder")
    _check_first_image(train[0][0])
    return LabelledLayout(root, tuple(classes), train_dir, train, val, None if has_val else float(val_fraction))


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` holding out ``round(n * val_fraction)`` of each class's ``n`` samples (at least one
    when the class has two or more, none when it has one), chosen by ``seed``; both lists sorted."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    val: list[int] = []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        count = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val.extend(rng.permutation(members)[:count].tolist())
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


class LabelledImages(ImageFolderDataset):
    """``(image, label)`` pairs: ``transform(PIL RGB image)`` (e.g. a ``(3, H, W)`` tensor) and an int label.

    Unreadable files are skipped as in ``ImageFolderDataset``; the label is that of the image actually read.
    """

    def __init__(self, root: Path, samples: list[tuple[Path, int]], transform, max_bad_fraction: float = 0.1):
        super().__init__(str(root), transform, max_bad_fraction, files=[path for path, _ in samples])
        self.targets = [label for _, label in samples]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self.files):  # also ends ``for image, label in dataset``
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        position, image = self._readable(index)
        return self.transform(image), self.targets[position]


def labelled_splits(layout: LabelledLayout, train_transform, eval_transform, seed: int,
                    max_bad_fraction: float = 0.1) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """The training and validation datasets of ``layout`` and the class names (label ``i`` is ``classes[i]``).

    With ``layout.val_fraction`` the training images are split by ``stratified_split(…, seed)``: the same seed
    gives the same split on every machine and every run.
    """
    train = list(layout.train)
    val = list(layout.val)
    if layout.val_fraction is not None:
        train_idx, val_idx = stratified_split([label for _, label in train], layout.val_fraction, seed)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    return (LabelledImages(layout.root, train, train_transform, max_bad_fraction),
            LabelledImages(layout.root, val, eval_transform, max_bad_fraction), list(layout.classes))
