"""The benchmark in a tiny CPU configuration (well-formed rows and output files, never timings), and the exactness of
the training step's speed-ups."""

import copy
import csv
import gc
import json
import math
import os
import re
import time
import weakref
from pathlib import Path

import pytest
import torch

from sparkme.bench import COLUMNS, BenchSettings, main, run_benchmark, steps
from sparkme.bench.memory import saved_activation_bytes
from sparkme.bench.peak_rss import peak_rss_delta
from sparkme.errors import UsageError
from sparkme.masking import random_mask

BACKENDS = ["minkowski", "torch", "masked"]
TINY = dict(batch_sizes=[2], image_size=64, repeats=1, warmup=0, device="cpu")


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    rows = run_benchmark(BenchSettings(["resnet18"], BACKENDS, [0.5], out_dir=out_dir, decoder_width=32, **TINY))
    return rows, out_dir


@pytest.fixture(scope="module")
def encoder_run():
    return run_benchmark(BenchSettings(["resnet18"], BACKENDS, [0.0, 0.75], include_train_step=False, out_dir=None,
                                       **TINY))


def _finite_positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_step_rows_have_every_backend_then_the_reference_step(step_run):
    rows, _ = step_run
    assert [r["backend"] for r in rows] == [*BACKENDS, "reference"]
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert (row["model"], row["batch"], row["ratio"], row["device"]) == ("resnet18", 2, 0.5, "cpu")
        for key in ("step_ms", "step_vs_masked", "step_vs_reference", "opt_ms", "step_mem_bytes",
                    "step_mem_vs_reference"):
            assert _finite_positive(row[key]), key
        # a difference of timings: may even be negative in a one-repeat smoke run
        assert math.isfinite(row["dense_ms"]) and math.isfinite(row["step_attainable_vs_reference"])
        assert row["dense_dtype"] == "float32"
        assert row["step_rss_bytes"] is not None and row["step_rss_bytes"] >= 0  # Linux: sampled
    backends, reference = rows[:-1], rows[-1]
    for row in backends:
        assert row["enc_ideal"] == pytest.approx(2.0) and _finite_positive(row["enc_vs_masked"])
        assert row["dense_layout"] == "channels_last"  # the CPU default of SparK.dense_layout
    assert reference["dense_layout"] == "contiguous" and reference["enc_ms"] is None
    assert reference["step_vs_reference"] == 1.0 and reference["step_mem_vs_reference"] == 1.0
    masked = rows[BACKENDS.index("masked")]
    assert masked["step_vs_masked"] == 1.0 and masked["enc_vs_masked"] == 1.0


@pytest.mark.slow
def test_attainable_ratio_is_the_step_with_an_ideal_encoder(step_run):
    rows, _ = step_run
    by_name = {r["backend"]: r for r in rows}
    ideal_encoder_ms = by_name["masked"]["enc_ms"] * by_name["masked"]["visible_frac"]
    for row in rows:
        expected_dense = row["step_ms"] - (row["enc_ms"] or by_name["masked"]["enc_ms"])
        assert row["dense_ms"] == pytest.approx(expected_dense)
        attainable = by_name["reference"]["step_ms"] / (ideal_encoder_ms + row["dense_ms"])
        assert row["step_attainable_vs_reference"] == pytest.approx(attainable)


@pytest.mark.slow
def test_encoder_only_run_has_no_step_columns(encoder_run):
    assert [r["backend"] for r in encoder_run] == BACKENDS * 2
    for row in encoder_run:
        assert _finite_positive(row["enc_ms"]) and row["enc_mem_bytes"] > 0
        assert all(row[k] is None for k in ("step_ms", "step_vs_reference", "opt_ms", "step_mem_bytes"))


@pytest.mark.slow
def test_true_sparse_backends_hold_less_activation_memory_at_a_higher_mask_ratio(encoder_run):
    memory = {(r["backend"], r["ratio"]): r["enc_mem_bytes"] for r in encoder_run}
    for backend in ("minkowski", "torch"):
        assert memory[(backend, 0.75)] < memory[(backend, 0.0)]


@pytest.mark.slow
def test_output_files(step_run):
    rows, out_dir = step_run
    with open(out_dir / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows) and csv_rows[-1]["enc_ms"] == ""
    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["rows"]) == len(rows) and data["rows"][0]["model"] == "resnet18"
    png = (out_dir / "speedup.png").read_bytes()
    assert len(png) > 1000 and png.startswith(b"\x89PNG")


def test_settings_are_checked_and_normalised_once_when_built(tmp_path):
    with pytest.raises(UsageError, match="unknown backend 'spconv'; choose one of minkowski, torch, masked"):
        BenchSettings(["resnet18"], ["spconv"], [0.5], out_dir=tmp_path, **TINY)
    assert not any(tmp_path.iterdir())
    settings = BenchSettings(["resnet18", "resnet18"], ["torch", "torch"], [0.5, 0.5], [4, 2, 4], device="auto")
    assert (settings.models, settings.backends, settings.ratios, settings.batch_sizes) == (
        ("resnet18",), ("torch", "masked"), (0.5,), (4, 2))
    assert settings.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "vgg11"], "unknown model 'vgg11': sparkme supports ResNets and these families: ResNet"),
        (["--models", "resnet_typo"], "unknown model 'resnet_typo': timm has no such model"),
        (["--ratios", "0.5,1.0"], r"mask ratio must be in \[0, 1\).*got 1.0"),
        (["--image-size", "100"], "image size 100x100 is not supported"),
        (["--batch-sizes", "0"], "batch size must be an integer >= 1, got 0"),
        (["--backends", "torch,spconv"], "unknown backend 'spconv'; choose one of minkowski, torch, masked"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        (["--device", "cuda:64"], "--device=cuda:64 but torch sees (no GPU|only \\d+ GPU)"),
    ],
)
def test_cli_reports_bad_settings_in_one_line_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sparkme-bench: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not (tmp_path / "out").exists()


def _two_steps(model, variant, images, mask) -> list[float]:
    """Losses of two pretraining steps of ``variant`` (the second sees the first's LAMB update)."""
    optimizer = steps.make_optimizer(model, "resnet18", images.shape[0])
    variant.apply(model, optimizer)
    losses = []
    for _ in range(2):
        torch.manual_seed(1)  # the same drop-path draws for every variant
        losses.append(model(images, mask).item())
        torch.manual_seed(1)
        steps.train_step(model, optimizer, images, mask)
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet18", "convnext_atto"])
def test_training_step_with_every_speed_up_equals_the_plain_step_in_float32(model_name):
    torch.manual_seed(0)
    plain = steps.build_model(model_name, torch.device("cpu"), decoder_width=32)
    fast = copy.deepcopy(plain)
    *fast_variants, reference = steps.variants(BACKENDS)
    assert not reference.fused_optimizer and all(v.fused_optimizer for v in fast_variants)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = random_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(1))
    expected = _two_steps(plain, reference, images, mask)
    for variant in fast_variants:  # every backend with the default speed-ups (channels-last, fused LAMB)
        model = copy.deepcopy(fast)
        assert _two_steps(model, variant, images, mask) == pytest.approx(expected, rel=1e-5), variant


def test_bf16_dense_half_is_opt_in_and_close():
    torch.manual_seed(0)
    model = steps.build_model("resnet18", torch.device("cpu"), decoder_width=32).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = random_mask(2, 2, 2, 0.5, generator=torch.Generator().manual_seed(1))
    assert model.dense_autocast is None
    exact = model(images, mask)
    model.dense_autocast = torch.bfloat16
    approximate = model(images, mask)
    assert approximate.dtype == torch.float32 and approximate.item() == pytest.approx(exact.item(), rel=5e-2)


def _count(model: torch.nn.Module, images: torch.Tensor) -> int:
    return saved_activation_bytes(lambda: [model(images)], [images, *model.parameters()])


def test_activation_count_leaves_no_graph_alive():
    """The saved-tensor hooks must not keep the counted graph (and through it the model) after the count."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU())
    assert _count(model, torch.randn(2, 3, 16, 16)) >= 2 * 8 * (14 * 14 + 12 * 12) * 4  # both ReLU outputs, float32
    weight = weakref.ref(model[0].weight)
    del model
    gc.collect()
    assert weight() is None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from Linux's /proc")
@pytest.mark.slow
def test_memory_after_the_kth_configuration_returns_to_the_first():
    """One process benchmarking model after model (the README's command) must not keep earlier models' memory."""
    settings = BenchSettings(["resnet18"], ["minkowski", "torch"], [0.6], include_train_step=False, out_dir=None,
                             **TINY)
    resident = []
    for _ in range(5):
        run_benchmark(settings)
        resident.append(_resident_bytes())
    # Each configuration of ResNet-18 held ~46 MB more (its forward graphs) before the fix; the margin is noise.
    assert max(resident[1:]) - resident[0] < 40 * 2**20, [f"{r / 2**20:.0f} MiB" for r in resident]


def test_peak_rss_sees_a_temporary_freed_before_the_call_returns():
    def touch_and_free():
        scratch = torch.ones(64 * 2**20 // 4)  # 64 MiB, written (resident), dropped at return
        time.sleep(0.05)  # a loaded machine may not schedule the sampler during the fill alone
        return float(scratch[-1])

    assert peak_rss_delta(touch_and_free) >= 48 * 2**20
    assert peak_rss_delta(lambda: None) < 16 * 2**20
