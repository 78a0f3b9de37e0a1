"""``sparkme-bench soak`` at a tiny size: it runs a backend, samples the process tree's memory every few steps and
reports the RSS slope and step-time drift after the warm-up (the full soak is a benchmark, docs/data-at-scale.md)."""

from __future__ import annotations

import json

import pytest

from sparkme.bench.cli import main
from sparkme.bench.soak import fit_slope, floor_slope


def test_the_slope_is_the_least_squares_one():
    assert fit_slope([0, 1000, 2000, 3000], [100, 104, 108, 112]) == pytest.approx(0.004)
    assert fit_slope([0, 1, 2, 3], [5, 7, 5, 7]) == pytest.approx(0.4)
    assert fit_slope([3, 3], [1, 2]) == 0.0


def test_the_floor_slope_ignores_samples_caught_mid_step_but_not_a_leak():
    steps = list(range(500, 3000, 50))
    flat = [1166.0] * len(steps)
    flat[-3], flat[-6], flat[-8] = 1204.0, 1194.0, 1178.0  # temporaries of the step being sampled, near the end
    assert fit_slope(steps, flat) * 1000 > 1.0  # they tilt the plain slope
    assert floor_slope(steps, flat) == 0.0  # each window still holds a sample between steps
    leak = [1000.0 + 0.01 * step + (30.0 if i % 5 == 2 else 0.0) for i, step in enumerate(steps)]
    assert floor_slope(steps, leak) * 1000 == pytest.approx(10.0)  # 10 MB per 1,000 steps, under the spikes
    assert floor_slope([0, 1, 2], [5.0, 6.0, 7.0], window=5) == pytest.approx(1.0)  # too few windows: plain slope


@pytest.mark.slow
def test_a_tiny_soak_reports_memory_slope_and_drift(tmp_path, capsys):
    assert main(["soak", "--backends", "torch", "--steps", "12", "--warmup", "2", "--every", "2", "--image-size", "32",
                 "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "soak.json").read_text())["results"]
    assert result["backend"] == "torch" and result["samples"] >= 3
    assert isinstance(result["rss_floor_slope_mb_per_1000_steps"], float)
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
