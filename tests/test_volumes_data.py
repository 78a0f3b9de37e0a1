"""data=volumes: lazy NIfTI crops (shapes, padding, resampling, normalisation, flips, seeds), the start-up checks of
bad input, a volume that breaks mid-run, and the peak memory of a crop from a large compressed volume."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sparkme.data.sampling import SeededItems
from sparkme.data.volumes import VolumeFolder, describe_spacings, holdout_split
from sparkme.data.volumes_checks import check_volumes
from sparkme.data.volumes_io import read_header, summarise
from sparkme.data.volumes_synthetic import write_blob_volumes
from sparkme.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def _save(path: Path, array: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    image = nibabel.Nifti1Image(array, np.diag([*zooms, 1.0]))
    nibabel.save(image, str(path))
    return path


def _data_cfg(root, **overrides):
    data = OmegaConf.load(REPO / "conf" / "data" / "volumes.yaml")
    data.root = str(root)
    for key, value in overrides.items():
        OmegaConf.update(data, key, value)
    return OmegaConf.create({"data": data, "eval": {"root": None, "every": 0}})


def test_crop_shape_padding_and_ct_window(tmp_path):
    ramp = np.linspace(-1000, 1000, 20 * 30 * 40, dtype=np.float32).reshape(20, 30, 40)
    _save(tmp_path / "ct.nii.gz", ramp)
    crop = VolumeFolder(str(tmp_path), crop_size=32, modality="ct", flips=False)[0]
    assert crop.shape == (1, 32, 32, 32) and crop.dtype == torch.float32
    assert crop.min() >= 0 and crop.max() <= 1
    # 20 voxels along D: 6 zero planes before and after (centred); 30 along H: one before, one after
    assert crop[:, :6].abs().sum() == 0 and crop[:, 26:].abs().sum() == 0 and crop[:, 6:26].abs().sum() > 0
    assert crop[:, :, :1].abs().sum() == 0 and crop[:, :, 31:].abs().sum() == 0
    inside = crop[0, 6:26, 1:31]  # the window [-175, 250] maps to [0, 1]; outside it is clipped
    expected = (np.clip(ramp, -175, 250) + 175) / 425
    assert any(torch.allclose(inside, torch.from_numpy(expected[:, :, s:s + 32]), atol=1e-6) for s in range(9))


def test_mri_zscore_uses_whole_volume_statistics(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(50, 10, size=(40, 40, 40)).astype(np.float32)
    _save(tmp_path / "mri.nii", volume)
    summary = summarise(tmp_path / "mri.nii", (0,), foreground=False)
    assert summary.mean[0] == pytest.approx(float(volume.astype(np.float64).mean()), rel=1e-6)
    assert summary.std[0] == pytest.approx(float(volume.astype(np.float64).std()), rel=1e-5)
    crop = VolumeFolder(str(tmp_path), crop_size=16, modality="mri", flips=False)[0]
    assert crop.shape == (1, 16, 16, 16)
    assert abs(float(crop.mean())) < 0.2 and 0.8 < float(crop.std()) < 1.2


def test_foreground_crop_stays_inside_the_nonzero_box(tmp_path):
    volume = np.zeros((64, 64, 64), np.float32)
    volume[20:44, 10:30, 30:60] = np.random.default_rng(1).uniform(1, 2, size=(24, 20, 30))
    _save(tmp_path / "fg.nii.gz", volume)
    summary = summarise(tmp_path / "fg.nii.gz", (0,), foreground=True)
    assert summary.box == ((20, 44), (10, 30), (30, 60))
    dataset = VolumeFolder(str(tmp_path), crop_size=32, modality="none", foreground_crop=True, flips=False)
    for index in range(4):
        crop = SeededItems(dataset, seed=index)[(0, 0)]
        # the box is 24 x 20 x 30: smaller than 32 everywhere, so the whole box is read and centred; no zero voxel
        # of the volume outside the box is ever read
        assert (crop != 0).sum() == 24 * 20 * 30


def test_resampling_to_a_target_spacing(tmp_path):
    _save(tmp_path / "coarse.nii.gz", np.ones((16, 16, 10), np.float32), zooms=(2.0, 2.0, 4.0))
    crop = VolumeFolder(str(tmp_path), crop_size=48, modality="none", spacing=(1.0, 1.0, 1.0), flips=False)[0]
    # 16 voxels of 2 mm -> 32 of 1 mm; 10 of 4 mm -> 40 of 1 mm; padded to 48
    assert (crop != 0).sum() == 32 * 32 * 40
    assert torch.allclose(crop[crop != 0], torch.ones(()))


def test_crops_are_seeded_and_flips_happen(tmp_path):
    write_blob_volumes(tmp_path, 2, (40, 40, 40))
    dataset = SeededItems(VolumeFolder(str(tmp_path), crop_size=32), seed=3)
    assert torch.equal(dataset[(0, 1)], dataset[(0, 1)])  # same (epoch, index): same crop
    assert not torch.equal(dataset[(0, 1)], dataset[(1, 1)])  # another epoch: another crop
    unflipped = VolumeFolder(str(tmp_path), crop_size=40, flips=False)[0]
    flipped = [SeededItems(VolumeFolder(str(tmp_path), crop_size=40), seed=s)[(0, 0)] for s in range(6)]
    assert any(not torch.equal(f, unflipped) for f in flipped)
    assert all(any(torch.equal(f, unflipped.flip(axes)) for axes in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3],
                                                                     [1, 2, 3])) for f in flipped)


def test_channels_stacked_or_split(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    _save(stack / "two.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 32, 2)).astype(np.float32))
    assert read_header(stack / "two.nii.gz").channels == 2
    assert VolumeFolder(str(stack), crop_size=32, channels=2)[0].shape == (2, 32, 32, 32)
    split = VolumeFolder(str(stack), crop_size=32, channel_mode="split")
    assert len(split) == 2 and split[1].shape == (1, 32, 32, 32)


def test_holdout_split_is_fixed_and_disjoint():
    files = [Path(f"v{i}.nii") for i in range(10)]
    train, held = holdout_split(files, 3)
    assert len(held) == 3 and not set(train) & set(held) and holdout_split(files, 3) == (train, held)
    assert holdout_split(files, 0) == (files, files)


def test_bundled_nibabel_volumes_are_read(tmp_path):
    anatomical = read_header(NIBABEL_DATA / "anatomical.nii")
    assert anatomical.shape == (33, 41, 25) and anatomical.channels == 1
    example = read_header(NIBABEL_DATA / "example4d.nii.gz")
    assert example.shape == (128, 96, 24) and example.channels == 2
    for name in ("anatomical.nii", "example4d.nii.gz"):
        (tmp_path / name).write_bytes((NIBABEL_DATA / name).read_bytes())
    dataset = VolumeFolder(str(tmp_path), crop_size=32, channel_mode="split", spacing=(1.0, 1.0, 1.0))
    assert len(dataset) == 3  # anatomical, and each of example4d's two channels
    assert describe_spacings(dataset.headers.values()) == "spacing 2x2x2 to 2x2x2.2 mm"  # logged at start
    assert all(dataset[i].shape == (1, 32, 32, 32) and torch.isfinite(dataset[i]).all() for i in range(3))


# --- bad input at start-up: one UsageError each ----------------------------------------------------------------
def _bad_folder(tmp_path, case: str) -> Path:
    folder = tmp_path / case
    folder.mkdir()
    if case == "empty":
        (folder / "notes.txt").write_text("no volumes here")
    elif case == "not_a_volume":
        write_blob_volumes(folder, 1, (32, 32, 32))
        (folder / "broken.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    elif case == "image_2d":
        _save(folder / "slice.nii.gz", np.ones((64, 64), np.float32))
    elif case == "flat_3d":
        _save(folder / "slab.nii.gz", np.ones((64, 64, 1), np.float32))
    elif case == "too_small":
        _save(folder / "tiny.nii.gz", np.ones((64, 64, 12), np.float32))
    elif case == "mixed_channels":
        _save(folder / "one.nii.gz", np.ones((32, 32, 32), np.float32))
        _save(folder / "two.nii.gz", np.ones((32, 32, 32, 2), np.float32))
    elif case == "wrong_channels":
        _save(folder / "two.nii.gz", np.ones((32, 32, 32, 2), np.float32))
    return folder


@pytest.mark.parametrize("case, words", [
    ("empty", "has no NIfTI volumes"), ("not_a_volume", "is not a readable NIfTI volume"),
    ("image_2d", "is a 2D image"), ("flat_3d", "is a 2D image"), ("too_small", "smaller than the model's mask block"),
    ("mixed_channels", "mixed channel counts"), ("wrong_channels", "data.channels=1 but the volumes have 2"),
    ("missing", "does not exist")])
def test_bad_input_is_refused_at_start_up(tmp_path, case, words):
    folder = tmp_path / "nowhere" if case == "missing" else _bad_folder(tmp_path, case)
    with pytest.raises(UsageError, match=words):
        check_volumes(_data_cfg(folder, crop_size=32), patch_size=16)


@pytest.mark.parametrize("override, words", [
    ({"crop_size": 40}, "multiple of the model's mask block"), ({"modality": "pet"}, "data.modality"),
    ({"spacing": [1, 1]}, "data.spacing"), ({"ct_window": [250, -175]}, "data.ct_window"),
    ({"holdout_volumes": 2}, "leaves no volume"), ({"channel_mode": "split", "channels": 2}, "must be 1")])
def test_bad_settings_are_refused(tmp_path, override, words):
    write_blob_volumes(tmp_path, 2, (32, 32, 32))
    with pytest.raises(UsageError, match=words):
        check_volumes(_data_cfg(tmp_path, **override), patch_size=16)


def test_good_folder_passes_and_knn_monitor_is_refused(tmp_path):
    write_blob_volumes(tmp_path, 2, (32, 32, 32))
    check_volumes(_data_cfg(tmp_path, crop_size=32), patch_size=16)
    cfg = _data_cfg(tmp_path, crop_size=32)
    cfg.eval.every = 5
    with pytest.raises(UsageError, match="kNN monitor"):
        check_volumes(cfg, patch_size=16)


def test_volume_broken_mid_run_is_skipped_and_counted(tmp_path, caplog):
    paths = write_blob_volumes(tmp_path, 3, (32, 32, 32))
    dataset = VolumeFolder(str(tmp_path), crop_size=32)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])  # truncated after the start-up checks read its header
    with caplog.at_level("WARNING"):
        crops = [dataset[i] for i in range(6)]
    assert all(c.shape == (1, 32, 32, 32) for c in crops)
    assert dataset.bad == {1}
    assert "skipping unreadable volume" in caplog.text and "1 of 3 volumes skipped" in caplog.text


RSS_SCRIPT = """
import json, sys
from pathlib import Path
from sparkme.data.volumes import VolumeFolder
def high_water_mb():  # VmHWM: the peak resident set size since the last reset
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
warm, big = sys.argv[1], sys.argv[2]
VolumeFolder(warm, crop_size=32, modality="mri", foreground_crop=True)[0]  # torch's first-use allocations
dataset = VolumeFolder(big, crop_size=160, modality="mri", foreground_crop=True)
Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the present RSS (Linux >= 4.0)
before = high_water_mb()
crop = dataset[0]
print(json.dumps({"peak_rise_mb": high_water_mb() - before, "shape": list(crop.shape)}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_crop_stays_below_the_volume(tmp_path):
    """A 256^3 float32 volume (64 MiB) stored compressed: z-score statistics, foreground box and a 160^3 crop raise
    the process's peak RSS (reset just before, so that the imports' peak does not hide it) by less than the
    volume's size."""
    warm, big = tmp_path / "warm", tmp_path / "big"
    write_blob_volumes(warm, 1, (32, 32, 32))
    big.mkdir()
    volume = np.random.default_rng(0).normal(size=(256, 256, 256)).astype(np.float32)  # noise: barely compressible
    _save(big / "ct.nii.gz", volume)
    size_mb = volume.nbytes / 2**20
    del volume
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(warm), str(big)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["shape"] == [1, 160, 160, 160]
    assert measured["peak_rise_mb"] < size_mb, measured
