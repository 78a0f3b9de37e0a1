"""Labelled image folders: both layouts, the seeded class-stratified split, and one clear error per bad folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sparkme.data.labelled import check_labelled_root, labelled_splits, stratified_split
from sparkme.errors import UsageError

TO_TENSOR = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])


def write_images(folder: Path, count: int, value: int = 0, size: int = 8) -> None:
    """``count`` PNGs of one grey level (``value``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(folder / f"{index}.png")


def test_train_and_val_folders_give_images_with_their_labels(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        write_images(tmp_path / split / "cat", count, value=10)
        write_images(tmp_path / split / "dog", count, value=200)
    layout = check_labelled_root(tmp_path, val_fraction=None)
    train, val, classes = labelled_splits(layout, TO_TENSOR, TO_TENSOR, seed=0)
    assert classes == ["cat", "dog"] and (len(train), len(val)) == (6, 4)
    for dataset in (train, val):
        for image, label in dataset:
            assert image.shape == (3, 8, 8)
            assert round(float(image[0, 0, 0]) * 255) == (10, 200)[label]


def test_val_fraction_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_images(tmp_path / "a", 10)
    write_images(tmp_path / "b", 20)
    write_images(tmp_path / "c", 1)  # too few to hold one out: stays in train
    layout = check_labelled_root(tmp_path, val_fraction=0.2)
    train, val, _ = labelled_splits(layout, TO_TENSOR, TO_TENSOR, seed=3)
    assert sorted(val.targets) == [0, 0, 1, 1, 1, 1]
    assert not set(train.files) & set(val.files) and len(train) + len(val) == 31
    again = labelled_splits(layout, TO_TENSOR, TO_TENSOR, seed=3)[1]
    other = labelled_splits(layout, TO_TENSOR, TO_TENSOR, seed=4)[1]
    assert again.files == val.files and other.files != val.files


def test_stratified_split_sizes():
    train, val = stratified_split([0] * 7 + [1] * 3, 0.5, seed=0)
    assert sorted(train + val) == list(range(10))
    assert sum(1 for i in val if i < 7) == 4 and sum(1 for i in val if i >= 7) == 2


def _bad_root(tmp_path: Path, case: str) -> tuple[Path, float | None]:
    root = tmp_path / case
    if case == "missing":
        return root, 0.1
    if case == "no_classes":
        root.mkdir()
        return root, 0.1
    if case == "one_class":
        write_images(root / "only", 4)
        return root, 0.1
    if case == "empty_class":
        write_images(root / "a", 4)
        (root / "b").mkdir()
        return root, 0.1
    if case == "unknown_val_class":
        write_images(root / "train" / "a", 2)
        write_images(root / "train" / "b", 2)
        write_images(root / "val" / "z", 2)
        return root, None
    if case in ("no_val_fraction", "bad_val_fraction"):
        write_images(root / "a", 4)
        write_images(root / "b", 4)
        return root, None if case == "no_val_fraction" else 1.0
    if case == "undecodable":
        write_images(root / "b", 2)
        (root / "a").mkdir()
        (root / "a" / "0.png").write_bytes(b"not an image")
        return root, 0.5
    raise AssertionError(case)


BAD_CASES = {
    "missing": "does not exist", "no_classes": "no class sub-folders", "one_class": "at least 2",
    "empty_class": "hold no images (b)", "unknown_val_class": "train/ lacks (z)",
    "no_val_fraction": "set data.val_fraction", "bad_val_fraction": "in (0, 1), got 1.0",
    "undecodable": "cannot be read",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_labelled_folders_raise_one_line(tmp_path, case):
    root, val_fraction = _bad_root(tmp_path, case)
    with pytest.raises(UsageError) as error:
        check_labelled_root(root, val_fraction)
    assert BAD_CASES[case] in str(error.value) and "\n" not in str(error.value)
