"""data=shards: shards written from a folder hold its images; every rank reads the same number of batches of an
epoch and no image twice, however uneven the shards; a resume reads exactly the rest of the epoch; damaged samples
are replaced and counted; bad shard settings end in one line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkme.data.shards import ShardImages
from sparkme.data.shards.layout import buffer_order
from sparkme.data.shards.tar_samples import iter_samples
from sparkme.data.shards.writer import write_shards
from sparkme.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
IMAGES_PER_CLASS = (9, 17, 24)  # 50 images in 3 classes; 7 per shard: 8 shards, the last with 1


def _identity(image: Image.Image) -> int:
    """Which image this is: the fixture paints image i with red i and green 100."""
    red, green, _ = image.getpixel((0, 0))
    assert green == 100
    return red


def _number(image: Image.Image) -> torch.Tensor:
    return torch.tensor(_identity(image))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    index = 0
    for label, count in enumerate(IMAGES_PER_CLASS):
        (root / f"class{label}").mkdir()
        for _ in range(count):
            Image.new("RGB", (12 + index % 5, 10), (index, 100, label)).save(root / f"class{label}" / f"{index}.png")
            index += 1
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(folder, out, per_shard=7)
    return out


def _pattern(shards: Path) -> str:
    return str(shards / "train-{000000..000007}.tar")


def _epoch(images: ShardImages, epoch: int, world: int, workers: int, batch: int = 4, start: int = 0):
    """Per rank, its batches of ``epoch`` as lists of image numbers."""
    return [[batch_.tolist() for batch_ in images.epoch_loader(batch, 1, workers, epoch, start, rank, world)]
            for rank in range(world)]


def test_shards_written_from_a_folder_hold_its_images_labels_and_manifest(folder, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [entry["samples"] for entry in manifest["shards"]] == [7] * 7 + [1]
    assert manifest["classes"] == ["class0", "class1", "class2"]
    seen = {}
    for entry in manifest["shards"]:
        for _, members in iter_samples(str(shards / entry["url"]), extra=frozenset({"path", "cls"})):
            path = members["path"].decode()
            assert (folder / path).read_bytes() == members["image"]  # the file's bytes, not re-encoded
            seen[path] = int(members["cls"])
    assert seen == {str(p.relative_to(folder)): int(p.parent.name[-1]) for p in folder.rglob("*.png")}


def test_one_epoch_on_one_rank_reads_every_image_of_the_folder_once(shards):
    images = ShardImages(_pattern(shards), _number, shuffle_buffer=5, seed=1)
    (batches,) = _epoch(images, 0, world=1, workers=0, batch=1)
    assert sorted(sum(batches, [])) == list(range(50))
    assert sum(batches, []) != list(range(50))  # shuffled


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_batches_and_no_image_twice(shards, world, workers):
    images = ShardImages(_pattern(shards), _number, shuffle_buffer=3, seed=0)
    orders = []
    for epoch in (0, 1):
        ranks = _epoch(images, epoch, world, workers)
        assert [len(r) for r in ranks] == [50 // world // 4] * world  # the same steps on every rank: no DDP hang
        read = [n for rank in ranks for batch in rank for n in batch]
        assert max(Counter(read).values()) == 1, Counter(read).most_common(3)
        orders.append(read)
    assert orders[0] != orders[1]  # each epoch its own order


@pytest.mark.parametrize("workers", [0, 3])
def test_a_loader_started_mid_epoch_reads_exactly_the_rest(shards, workers):
    images = ShardImages(_pattern(shards), torch.nn.Identity(), seed=2, shuffle_buffer=4)
    images.transform = lambda image: torch.rand(2)  # the seeded augmentation's draws: part of what must repeat
    for rank in range(2):
        whole = list(images.epoch_loader(3, 1, workers, 0, 0, rank, 2))
        for start_batch in (1, 4, len(whole) - 1):
            rest = list(images.epoch_loader(3, 1, workers, 0, 3 * start_batch, rank, 2))
            assert len(rest) == len(whole) - start_batch
            assert all(torch.equal(a, b) for a, b in zip(whole[start_batch:], rest, strict=True))


def test_pipe_shards_read_as_local_ones(shards):
    local = ShardImages(_pattern(shards), _number, seed=0)
    piped = ShardImages(f"pipe:cat {_pattern(shards)}", _number, manifest=str(shards / "manifest.json"), seed=0)
    assert _epoch(local, 0, 2, 2) == _epoch(piped, 0, 2, 2)


def test_the_shuffle_buffer_holds_at_most_its_size():
    import random

    order = buffer_order(100, 8, random.Random(0))
    assert sorted(order) == list(range(100))
    assert all(position <= index + 8 for index, position in enumerate(order))  # read at most 8 samples ahead
    assert order != tuple(range(100))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(number: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (number, 100, 0)).save(out, format="PNG")
    return out.getvalue()


def test_corrupt_and_missing_samples_are_replaced_counted_and_never_crash(tmp_path, caplog):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for number in range(6):
            _add(tar, f"{number:04d}.png", b"not an image" if number in (1, 5) else _png(number))
        _add(tar, "0006.txt", b"a sample without an image")
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for number in range(10, 16):
            _add(tar, f"{number:04d}.png", _png(number))
    (tmp_path / "b.tar").write_bytes(whole.getvalue()[:2600])  # cut inside the third sample
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"url": "a.tar", "samples": 7},
                                                                   {"url": "b.tar", "samples": 6}]}))
    images = ShardImages(str(tmp_path / "*.tar"), _number, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING):
        (batches,) = _epoch(images, 0, world=1, workers=0, batch=13)
    read = batches[0]
    assert len(read) == 13 and set(read) <= {0, 2, 3, 4, 10, 11}
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert len(skipped) == 13 - 6 and skipped[-1].endswith("7 skipped by this worker in epoch 0")
    assert any("b.tar is damaged" in r.getMessage() for r in caplog.records)
    assert _epoch(images, 0, 1, 0, batch=13) == [batches]  # the same replacements every time (a resume's too)


def test_bad_shard_settings_are_user_errors(shards, tmp_path):
    with pytest.raises(UsageError, match="matches no file"):
        ShardImages(str(tmp_path / "nothing-*.tar"), _number)
    with pytest.raises(UsageError, match="train-000008.tar. does not exist"):
        ShardImages(str(shards / "train-{000000..000009}.tar"), _number)
    with pytest.raises(UsageError, match="pipe: shards need data.manifest"):
        ShardImages(f"pipe:cat {shards}/train-000000.tar", _number)
    with pytest.raises(UsageError, match="needs data.urls"):
        ShardImages(None, _number)
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UsageError, match="not a readable tar file"):
        ShardImages(str(tmp_path / "broken.tar"), _number)
    with pytest.raises(UsageError, match="data.num_workers=8 is more than the 6 batch"):
        ShardImages(_pattern(shards), _number).epoch_loader(4, 1, 8, 0, 0, 0, 2)


@pytest.mark.slow
def test_a_missing_shard_ends_sparkme_pretrain_in_one_line(shards, tmp_path):
    missing = str(shards / "train-{000000..000012}.tar")
    done = subprocess.run([sys.executable, "-m", "sparkme.cli", "debug=fast", "data=shards", f'data.urls="{missing}"',
                           f"run_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"sparkme-pretrain: error: data.urls: shard '{shards}/train-000008.tar' does not exist; give existing .tar "
        "shards, a brace pattern (train-{000000..000099}.tar) or pipe:<command>"]


def test_the_torchvision_decoder_reads_jpegs_and_leaves_other_formats_to_pil():
    from sparkme.data.shards.stream import decode

    encoded = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 40, 90)).save(encoded, format="JPEG", quality=95)
    tensor, _ = decode(encoded.getvalue(), "torchvision")
    pil, _ = decode(encoded.getvalue(), "pil")
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 8, 16) and tensor.dtype == torch.uint8
    assert (tensor.int() - torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()).abs().max() <= 2
    assert isinstance(decode(_png(7), "torchvision")[0], Image.Image)
    assert decode(b"\xff\xd8 broken", "torchvision")[0] is None
    with pytest.raises(UsageError, match="data.decoder must be one of pil, torchvision, got 'turbo'"):
        ShardImages(str(Path(__file__)), _number, decoder="turbo")


def test_imagenet_sized_layout_1281_uneven_shards_on_24_ranks_of_8_workers():
    from sparkme.data.shards.layout import rank_streams

    sizes = torch.randint(700, 1300, (1281,), generator=torch.Generator().manual_seed(0)).tolist()
    batch, world, workers = 32, 24, 8
    rank_batches = sum(sizes) // world // batch
    covered = []
    for rank in range(world):
        plans = rank_streams(sizes, 0, 5, rank, rank_batches, batch, workers, buffer=1)
        assert sum(len(plan.order) for plan in plans) == rank_batches * batch  # the same on every rank
        for plan in plans:
            assert sum(piece.count for piece in plan.pieces) == len(plan.order)
            covered.append((plan.first_position, plan.first_position + len(plan.order)))
    covered.sort()
    assert all(end == next_start for (_, end), (next_start, _) in zip(covered, covered[1:]))  # no overlap, no gap
    assert covered[0][0] == 0 and sum(sizes) - covered[-1][1] < world * batch


def test_sparkme_shards_count_writes_the_manifest_that_write_wrote(shards, tmp_path, capsys):
    from sparkme.data.shards.cli import main

    main(["count", _pattern(shards), "--manifest", str(tmp_path / "counted.json")])
    written = json.loads((shards / "manifest.json").read_text())
    assert json.loads((tmp_path / "counted.json").read_text())["shards"] == written["shards"]
    with pytest.raises(SystemExit) as exit_:
        main(["write", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"sparkme-shards: error: '{tmp_path / 'nowhere'}' is not a folder; give "
                                              "a folder of images (flat or one sub-folder per class)")
