"""kNN and features at ImageNet size: the bank is read in blocks (no normalised copy of it, float16 allowed) with the
same neighbours, ties and scores as one product over the whole bank; features come from shards as from a folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_probe import reference_knn  # the brute-force float64 reference (one query, one neighbour at a time)
from torch import nn
from torchvision.transforms import v2

from sparkme.data.shards import LabelledShards
from sparkme.data.shards.writer import write_shards
from sparkme.evaluation.features import extract_features
from sparkme.evaluation.knn import knn_scores, ranked_classes

REPO = Path(__file__).resolve().parent.parent


def _bank(ties: bool):
    generator = torch.Generator().manual_seed(3)
    if ties:  # repeated vectors: neighbours tie at the k-th place, across block borders
        vectors = torch.randn(5, 8, generator=generator)
        train = vectors[torch.randint(0, 5, (90,), generator=generator)]
        queries = vectors[torch.randint(0, 5, (20,), generator=generator)] + 0.2 * torch.randn(20, 8,
                                                                                                  generator=generator)
    else:
        train, queries = torch.randn(90, 16, generator=generator), torch.randn(20, 16, generator=generator)
    return train, torch.randint(0, 6, (90,), generator=generator), queries


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block", [1, 7, 40])
def test_a_bank_read_in_blocks_gives_the_whole_banks_neighbours_and_scores(ties, block):
    train, labels, queries = _bank(ties)
    expected, ranked = reference_knn(train, labels, queries, 6, k=11, temperature=0.3)
    blocked = knn_scores(train, labels, queries, 6, k=11, temperature=0.3, chunk=6, block=block)
    assert torch.allclose(blocked.double(), expected, rtol=1e-5)
    assert ranked_classes(blocked).tolist() == ranked


def test_a_float16_bank_scores_as_its_float32_values():
    train, labels, queries = _bank(False)
    half = train.half()
    assert torch.equal(knn_scores(half, labels, queries, 6, k=5, block=16),
                       knn_scores(half.float(), labels, queries, 6, k=5, block=16))


MEMORY = """
import resource, torch
from sparkme.evaluation.knn import knn_scores
bank = torch.empty(60000, 1024).normal_()
labels, queries = torch.randint(0, 1000, (60000,)), torch.randn(512, 1024)
knn_scores(bank[:100], labels[:100], queries[:4], 1000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
knn_scores(bank, labels, queries, 1000, chunk=512)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_the_knn_adds_far_less_memory_than_its_bank():
    done = subprocess.run([sys.executable, "-c", MEMORY], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    grown_mib = float(done.stdout.split()[-1])
    assert grown_mib < 234 / 2, f"the kNN's peak grew by {grown_mib:.0f} MiB over a 234 MiB bank"


def test_features_from_shards_are_the_folders_and_float16_halves_them(tmp_path):
    folder = tmp_path / "folder"
    generator = torch.Generator().manual_seed(0)
    for label in range(3):
        (folder / f"c{label}").mkdir(parents=True)
        for index in range(5):
            pixels = torch.randint(0, 256, (9, 11, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{index}.png")
    write_shards(folder, tmp_path / "shards", per_shard=4)
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((6, 6)), v2.ToDtype(torch.float32, scale=True)])
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    dataset = LabelledShards(str(tmp_path / "shards" / "train-*.tar"), transform)
    features, labels = extract_features(encoder, dataset, batch_size=4, num_workers=2)
    with torch.no_grad():
        expected = {(label, tuple(encoder(transform(Image.open(path).convert("RGB"))[None])[0].round(decimals=4)
                                  .tolist())) for label in range(3) for path in (folder / f"c{label}").glob("*.png")}
    assert len(features) == 15
    assert {(int(y), tuple(x.round(decimals=4).tolist())) for x, y in zip(features, labels, strict=True)} == expected
    half, half_labels = extract_features(encoder, dataset, batch_size=4, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == features.shape
    assert sorted(half_labels.tolist()) == sorted(labels.tolist())
