"""sparkme-probe: kNN against a brute-force reference, features against the dense timm / torchvision models, MAE's
linear probe learning, the cached end-to-end command, and one-line errors for bad folders."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from sparkme.evaluation import cli
from sparkme.evaluation.features import PooledEncoder
from sparkme.evaluation.knn import knn_accuracy, knn_scores, ranked_classes
from sparkme.evaluation.linear_probe import LinearProbeSettings, linear_probe

REPO = Path(__file__).resolve().parent.parent


def reference_knn(train: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int,
                  temperature: float) -> tuple[torch.Tensor, list[list[int]]]:
    """Class scores and ranked classes per query, one query and one neighbour at a time in float64: neighbours by
    (-similarity, index), each adding exp(sim / T) to its class; classes by (-score, class)."""
    all_scores, ranked = [], []
    for query in queries.double():
        sims = [float(query @ row / (query.norm() * row.norm())) for row in train.double()]
        neighbours = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
        scores = [0.0] * num_classes
        for i in neighbours:
            scores[int(labels[i])] += math.exp(sims[i] / temperature)
        all_scores.append(scores)
        ranked.append(sorted(range(num_classes), key=lambda c: (-round(scores[c], 6), c)))
    return torch.tensor(all_scores, dtype=torch.float64), ranked


@pytest.mark.parametrize("ties", [False, True])
def test_knn_equals_brute_force_reference(ties):
    generator = torch.Generator().manual_seed(1)
    if ties:  # 4 distinct vectors, repeated: neighbours tie, also at the k-th place, and classes tie in score
        vectors = torch.randn(4, 8, generator=generator)
        train = vectors[torch.randint(0, 4, (60,), generator=generator)]
        queries = vectors[torch.randint(0, 4, (25,), generator=generator)]
        queries = queries + 0.3 * torch.randn(25, 8, generator=generator)
    else:
        train, queries = torch.randn(80, 16, generator=generator), torch.randn(30, 16, generator=generator)
    labels = torch.randint(0, 7, (train.shape[0],), generator=generator)
    expected, ranked = reference_knn(train, labels, queries, 7, k=9, temperature=0.5)
    scores = knn_scores(train, labels, queries, 7, k=9, temperature=0.5, chunk=8)
    assert torch.allclose(scores.double(), expected, rtol=1e-5)
    assert ranked_classes(scores)[:, :5].tolist() == [r[:5] for r in ranked]
    truth = torch.randint(0, 7, (queries.shape[0],), generator=generator)
    accuracy = knn_accuracy(train, labels, queries, truth, 7, k=9, temperature=0.5)
    assert accuracy["top1"] == pytest.approx(100.0 * np.mean([int(t) == r[0] for t, r in zip(truth, ranked)]))
    assert accuracy["top5"] == pytest.approx(100.0 * np.mean([int(t) in r[:5] for t, r in zip(truth, ranked)]))


def test_knn_weights_are_exp_similarity_over_t():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(train, labels, torch.tensor([[2.0, 0.0]]), 2, k=2, temperature=0.07)
    assert torch.allclose(scores, torch.tensor([[math.exp(1 / 0.07), math.exp(0.6 / 0.07)]]), rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "torchvision_resnet18"])
def test_probe_features_are_the_dense_models_pooled_last_stage(name):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    if name.startswith("torchvision_"):
        model = torchvision.models.resnet18().eval()
        trunk = torch.nn.Sequential(*list(model.children())[:-2])  # everything before avgpool and fc
        expected = trunk(images).mean(dim=(2, 3))
    else:
        model = timm.create_model(name).eval()
        expected = model.forward_features(images).mean(dim=(2, 3))  # ConvNeXt: before its head's norm
    with torch.no_grad():
        assert torch.allclose(PooledEncoder(model).eval()(images), expected, atol=1e-5)


@pytest.mark.parametrize("optimizer, trust", [("lars", 1.0), ("sgd", None)])
def test_linear_probe_learns_separable_features(optimizer, trust):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator)
    labels = torch.arange(4).repeat(40)
    features = centres[labels] + torch.randn(160, 32, generator=generator)
    # 120 samples: MAE's trust coefficient (0.001) would leave the weight at its initialisation (module docstring)
    settings = LinearProbeSettings(epochs=20, warmup_epochs=2, batch_size=32, optimizer=optimizer,
                                   **({"trust_coefficient": trust} if trust else {}))
    result = linear_probe(features[:120], labels[:120], features[120:], labels[120:], 4, settings, seed=0)
    assert result["top1"] >= 90.0
    assert linear_probe(features[:120], labels[:120], features[120:], labels[120:], 4, settings, seed=0) == result


def _folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_probe_command_loads_an_export_and_caches_its_features(tmp_path):
    root = _folder(tmp_path / "data", {"a": 6, "b": 6, "c": 6})
    exported = timm.create_model("resnet18", num_classes=0).state_dict()
    torch.save(exported, tmp_path / "export.pt")
    argv = ["model=resnet18", f"init={tmp_path / 'export.pt'}", f"data.root={root}", "data.val_fraction=0.34",
            "image_size=32", "num_workers=0", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'probe.json'}",
            "linear.epochs=3", "linear.warmup_epochs=1"]
    first = cli.run(argv)
    assert not first["features_cached"] and (first["train_images"], first["val_images"]) == (12, 6)
    assert "fc" in first["weights"] and 0 <= first["knn_top1"] <= 100 and first["knn_top5"] == 100.0
    second = cli.run(argv)
    assert second["features_cached"] and second["knn_top1"] == first["knn_top1"]
    assert json.loads((tmp_path / "probe.json").read_text())["linear_top1"] == second["linear_top1"]
    baseline = cli.run([*argv[:1], "init=null", *argv[2:]])
    assert not baseline["features_cached"] and baseline["features_file"] != first["features_file"]


def test_a_bad_folder_ends_in_one_line_exit_2_from_the_command_line(tmp_path):
    root = _folder(tmp_path / "one", {"only": 3})
    done = subprocess.run([sys.executable, "-m", "sparkme.evaluation.cli", "model=resnet18", f"data.root={root}",
                           "data.val_fraction=0.3"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"sparkme-probe: error: data.root: {str(root)!r} has 1 class folder "
                                                "(only); a classifier needs at least 2"]


@pytest.mark.parametrize("case", ["unknown_val_class", "wrong_model_file", "bad_optimizer"])
def test_bad_input_ends_in_one_line_exit_2(tmp_path, capsys, case):
    ok = [f"data.root={_folder(tmp_path / 'ok', {'a': 2, 'b': 2})}", "data.val_fraction=0.5"]
    if case == "unknown_val_class":
        _folder(tmp_path / "split" / "train", {"a": 2, "b": 2})
        _folder(tmp_path / "split" / "val", {"z": 1})
        args, expected = [f"data.root={tmp_path / 'split'}"], "train/ lacks (z)"
    elif case == "wrong_model_file":
        torch.save({"model_name": "resnet50", "model": {"encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "r50.pt")
        args, expected = [*ok, f"init={tmp_path / 'r50.pt'}"], "are of resnet50; this run builds resnet18"
    else:
        args, expected = [*ok, "linear.optimizer=adam"], "linear.optimizer must be one of auto, lars, sgd, got 'adam'"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["model=resnet18", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparkme-probe: error:") and expected in lines[0], lines
