"""``sparkme-bench soak``: a long pretraining run per backend on small images, watching host memory and step time.

    sparkme-bench soak --backends torch,masked,minkowski,ddp --steps 3000

Each backend runs ``sparkme-pretrain`` (``debug=fast`` at ``--image-size`` px on the bundled photos; ``ddp``: the
``torch`` backend on two torchrun ranks over gloo) in its own process; every ``--every`` steps (read from its
``metrics.jsonl``) the resident memory of the whole process tree is sampled. After ``--warmup`` steps:

- **RSS slope**: the least-squares slope of the samples (the last step's left out: the held-out loss, checkpoint
  and exports of the run's end run then), in MB per 1,000 steps (a leak shows as a steady slope;
  target < 5);
- **floor slope**: the same fit through the lowest sample of each run of ``FLOOR_WINDOW`` samples. A sample taken
  inside a step also holds that step's temporaries; the memory between steps is the floor, and a leak raises the
  floor, while a few samples caught mid-step (which can tilt the plain slope of a short run) do not;
- **step-time drift**: the mean step time of the last third of the samples against the first third, in %.

Results: a table on stdout and ``soak.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sparkme.bench.report import cpu_model
from sparkme.errors import UsageError, run_reporting_usage_errors

PROG = "sparkme-bench soak"
FLOOR_WINDOW = 5  # samples per floor point: 10 points over 3,000 steps sampled every 50 after a 500-step warm-up
BACKENDS = ("torch", "masked", "minkowski", "ddp")


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MB (10^6 bytes)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
        pending.extend(_children(current))
    return total / 1e6


def _last_step(metrics: Path) -> int | None:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        if line.endswith("}") and '"loss"' in line:
            return int(json.loads(line)["step"])
    return None


def _command(backend: str, run_dir: Path, steps: int, every: int, image_size: int) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29655"] if backend == "ddp" \
        else []
    engine = "torch" if backend == "ddp" else backend
    return [sys.executable, *launcher, "-m", "sparkme.cli", "debug=fast", f"backend={engine}", "trainer.device=cpu",
            f"image_size={image_size}", f"trainer.max_steps={steps}",
            f"trainer.log_every={every}", "trainer.vis_every=0", "trainer.ckpt_every=0", "export_formats=[]",
            "data.dataset.crops_per_epoch=4096", f"run_dir={run_dir}"]


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def floor_slope(steps: Sequence[int], mb: Sequence[float], window: int = FLOOR_WINDOW) -> float:
    """Least-squares slope of the lowest value of each run of ``window`` consecutive samples, over the mean step of
    that run (a last, shorter run counts when it holds at least half a window); the plain slope when there are
    fewer than two such runs."""
    points = []
    for start in range(0, len(steps), window):
        part = range(start, min(start + window, len(steps)))
        if len(part) * 2 >= window:
            points.append((sum(steps[i] for i in part) / len(part), min(mb[i] for i in part)))
    if len(points) < 2:
        return fit_slope(steps, mb)
    return fit_slope([x for x, _ in points], [y for _, y in points])


def soak(backend: str, steps: int, warmup: int, every: int, image_size: int) -> dict:
    """Run one backend; its samples and figures."""
    with tempfile.TemporaryDirectory() as temporary:
        run_dir = Path(temporary) / backend
        process = subprocess.Popen(_command(backend, run_dir, steps, every, image_size), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
        samples: list[tuple[int, float, float]] = []  # (step, seconds, MB)
        while process.poll() is None:
            step = _last_step(run_dir / "metrics.jsonl")
            if step is not None and (not samples or step > samples[-1][0]):
                samples.append((step, time.perf_counter(), tree_rss_mb(process.pid)))
            time.sleep(0.05)
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the {backend} soak run failed: {stderr[-3000:]}")
    kept = [s for s in samples if warmup <= s[0] < steps]  # the last step's sample also holds the run's ending
    if len(kept) < 3:
        raise RuntimeError(f"{backend}: only {len(kept)} samples after the warm-up; lower --every or --warmup")
    kept_steps, kept_mb = [s[0] for s in kept], [s[2] for s in kept]
    slope, floor = fit_slope(kept_steps, kept_mb) * 1000, floor_slope(kept_steps, kept_mb) * 1000
    third = max(2, len(kept) // 3)

    def step_s(part: list[tuple[int, float, float]]) -> float:
        return (part[-1][1] - part[0][1]) / max(1, part[-1][0] - part[0][0])

    first, last = step_s(kept[:third]), step_s(kept[-third:])
    return {"backend": backend, "steps": steps, "warmup": warmup, "samples": len(kept),
            "rss_mb_start": kept[0][2], "rss_mb_end": kept[-1][2], "rss_slope_mb_per_1000_steps": slope,
            "rss_floor_slope_mb_per_1000_steps": floor,
            "step_ms_first_third": 1000 * first, "step_ms_last_third": 1000 * last,
            "step_time_drift_pct": 100 * (last - first) / first if first else 0.0,
            "trace": [list(s) for s in samples]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list from {', '.join(BACKENDS)}")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500, help="steps left out of the figures")
    parser.add_argument("--every", type=int, default=50, help="steps between memory samples")
    parser.add_argument("--image-size", type=int, default=64, help="64: 2 x 2 patches, some masked (at 32 none is)")
    parser.add_argument("--out", default="soak_results", help="folder for soak.json")
    args = parser.parse_args(argv)

    def run() -> None:
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
        unknown = [name for name in backends if name not in BACKENDS]
        if unknown or not backends:
            raise UsageError(f"--backends: unknown {', '.join(unknown) or 'empty list'}; choose from "
                             f"{', '.join(BACKENDS)}")
        if not 0 <= args.warmup < args.steps or args.every < 1:
            raise UsageError(f"need 0 <= --warmup < --steps and --every >= 1, got --warmup {args.warmup} --steps "
                             f"{args.steps} --every {args.every}")
        print(f"CPU: {cpu_model()}; {args.steps} steps at {args.image_size} px, batch 2, figures after "
              f"{args.warmup}", flush=True)
        print("| backend | RSS after warm-up (MB) | RSS at end (MB) | RSS slope (MB / 1,000 steps) | floor slope | "
              "step ms (first third -> last third) | drift |")
        print("|---|---|---|---|---|---|---|", flush=True)
        results = []
        for backend in backends:
            result = soak(backend, args.steps, args.warmup, args.every, args.image_size)
            results.append(result)
            print(f"| {backend} | {result['rss_mb_start']:.0f} | {result['rss_mb_end']:.0f} | "
                  f"{result['rss_slope_mb_per_1000_steps']:+.2f} | "
                  f"{result['rss_floor_slope_mb_per_1000_steps']:+.2f} | {result['step_ms_first_third']:.1f} -> "
                  f"{result['step_ms_last_third']:.1f} | {result['step_time_drift_pct']:+.1f} % |", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=1))
        print(f"wrote {out / 'soak.json'}")

    run_reporting_usage_errors(PROG, run)
    return 0
