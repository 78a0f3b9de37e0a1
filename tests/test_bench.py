"""The backend benchmark in a tiny CPU configuration: well-formed rows and output files (never timings)."""

import csv
import json
import math
import re

import pytest

from sparkme.bench import COLUMNS, main, run_benchmark

BACKENDS = ["minkowski", "torch", "masked"]
RATIOS = [0.0, 0.75]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    rows = run_benchmark(models=["resnet18"], backends=BACKENDS, ratios=RATIOS, batch_sizes=[2], image_size=64,
                         repeats=1, warmup=0, device="cpu", include_train_step=False, out_dir=out_dir)
    return rows, out_dir


def test_rows_are_well_formed(tiny_run):
    rows, _ = tiny_run
    assert len(rows) == len(BACKENDS) * len(RATIOS)
    assert {(r["backend"], r["ratio"]) for r in rows} == {(b, r) for b in BACKENDS for r in RATIOS}
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert row["model"] == "resnet18" and row["batch"] == 2 and row["device"] == "cpu"
        assert math.isfinite(row["img_per_s"]) and row["img_per_s"] > 0
        assert math.isfinite(row["speedup_vs_masked"]) and row["speedup_vs_masked"] > 0
        assert row["ideal_speedup"] == pytest.approx(1.0 / (1.0 - row["ratio"]))
        assert row["mem_kind"] == "cpu_saved_tensors" and row["mem_bytes"] > 0
        assert row["train_img_per_s"] is None and row["train_speedup_vs_masked"] is None
        if row["backend"] == "masked":
            assert row["speedup_vs_masked"] == 1.0 and row["mem_vs_masked"] == 1.0


def test_true_sparse_backends_hold_less_activation_memory_at_a_higher_mask_ratio(tiny_run):
    rows, _ = tiny_run
    memory = {(r["backend"], r["ratio"]): r["mem_bytes"] for r in rows}
    for backend in ("minkowski", "torch"):
        assert memory[(backend, 0.75)] < memory[(backend, 0.0)]


def test_output_files(tiny_run):
    rows, out_dir = tiny_run
    with open(out_dir / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert all(r["train_img_per_s"] == "" for r in csv_rows)
    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and data["rows"][0]["model"] == "resnet18"
    png = (out_dir / "speedup.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")


def test_unknown_backend_lists_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'spconv'; choose from minkowski, torch, masked"):
        run_benchmark(["resnet18"], ["spconv"], [0.5], [1], 64, 1, 0, "cpu", False, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "vgg11"], "unknown model 'vgg11'; choose a ResNet"),
        (["--ratios", "0.5,1.0"], r"mask ratio must be in \[0, 1\).*got 1.0"),
        (["--image-size", "100"], "image size 100x100 is not supported"),
        (["--batch-sizes", "0"], "batch size must be an integer >= 1, got 0"),
        (["--backends", "torch,spconv"], "unknown backend 'spconv'; choose from minkowski, torch, masked"),
    ],
)
def test_cli_rejects_bad_settings_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
