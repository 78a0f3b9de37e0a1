"""``sparkme-bench soak`` at a tiny size: it runs a backend, samples the process tree's memory every few steps and
reports the RSS slope and step-time drift after the warm-up (the full soak is a benchmark, docs/data-at-scale.md)."""

from __future__ import annotations

import json

import pytest

from sparkme.bench.cli import main
from sparkme.bench.soak import fit_slope


def test_the_slope_is_the_least_squares_one():
    assert fit_slope([0, 1000, 2000, 3000], [100, 104, 108, 112]) == pytest.approx(0.004)
    assert fit_slope([0, 1, 2, 3], [5, 7, 5, 7]) == pytest.approx(0.4)
    assert fit_slope([3, 3], [1, 2]) == 0.0


@pytest.mark.slow
def test_a_tiny_soak_reports_memory_slope_and_drift(tmp_path, capsys):
    assert main(["soak", "--backends", "torch", "--steps", "12", "--warmup", "2", "--every", "2", "--image-size", "32",
                 "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "soak.json").read_text())["results"]
    assert result["backend"] == "torch" and result["samples"] >= 3
    steps = [step for step, _, _ in result["trace"]]
    assert steps == sorted(steps) and steps[-1] == 12
    assert all(rss > 50 for _, _, rss in result["trace"])  # the run's own process tree, not nothing
    assert "| torch |" in capsys.readouterr().out


def test_bad_soak_settings_end_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["soak", "--backends", "torch,tpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("sparkme-bench soak: error: --backends: unknown tpu; choose from "
                                              "torch, masked, minkowski, ddp")
