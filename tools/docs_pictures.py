"""The documentation's pictures, each from a finished run or a committed benchmark output (``tools/docs_pictures.sh``
makes the runs, then calls this for every picture).

    python tools/docs_pictures.py reconstruction --run runs/docs/demo_long --steps 0 256 1024 --labels \\
        --out docs/assets/reconstruction_long.png
    python tools/docs_pictures.py curves --run runs/demo --out docs/assets/demo_loss.png
    python tools/docs_pictures.py speed --bench docs/bench/2026-11-29_whole_step.txt --out docs/assets/speedup.png

``reconstruction``: the run's fixed held-out images (those its own ``reconstructions/`` show) with their masks;
columns original | masked input | the reconstruction at each step (step 0: the weights the run started from, rebuilt
from its config and seed; step N: ``checkpoints/step_N.pt``, kept by ``trainer.keep_every``); ``--labels``: a title
over each column.
``curves``: the training loss (as logged, a mean over ``trainer.log_every`` steps) and the held-out loss of
``metrics.jsonl``.
``speed``: whole-step speed-up against SparK's step per model and mask ratio, from ``sparkme-bench``'s printed tables:
the ``masked`` backend (no sparsity: the other savings), the sparse backends, and the attainable bound (the same step
with the encoder at its ideal).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _figure(width: float, height: float):
    # The object API with the Agg canvas: no pyplot state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def reconstruction(run: Path, steps: list[int], out: Path, images: int, scale: int, labels: bool = False) -> None:
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf, open_dict
    from torchvision.utils import save_image

    from sparkme.data.transforms import denormalize
    from sparkme.engine.checkpoint import load_checkpoint
    from sparkme.engine.distributed import DistInfo
    from sparkme.engine.pretrain import _build, _fixed_batch

    checkpoints = {step: run / "checkpoints" / f"step_{step:07d}.pt" for step in steps if step}
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        sys.exit(f"docs_pictures.py: error: no checkpoint {', '.join(missing)} (run with trainer.keep_every)")
    config = load_checkpoint(next(iter(checkpoints.values())) if checkpoints else run / "checkpoints" / "latest.pt")
    cfg = OmegaConf.create(config["config"])
    with open_dict(cfg):
        cfg.trainer.sync_bn = False
    built = _build(cfg, DistInfo())  # step 0: the run's initial weights (same seed, same construction)
    spark = built.spark.eval()
    pictures, masks = _fixed_batch(cfg, spark, torch.device("cpu"), int(cfg.trainer.eval_images))
    pictures, masks = pictures[:images], masks[:images]
    columns = []
    for step in steps:
        if step:
            spark.load_state_dict(load_checkpoint(checkpoints[step])["model"])
        original, masked, rebuilt = spark.reconstruct(pictures, masks)
        if not columns:
            columns += [original, masked]
        columns.append(rebuilt)
    grid = torch.stack([denormalize(c) for c in columns], dim=1).flatten(0, 1)
    grid = F.interpolate(grid, scale_factor=scale, mode="nearest")  # small CPU images, readable on a page
    out.parent.mkdir(parents=True, exist_ok=True)
    if labels:
        titles = ["original", f"masked ({cfg.mask_ratio:.0%})"] + [f"step {step:,}" for step in steps]
        _labelled_grid(grid.clamp(0, 1), titles, out)
    else:
        save_image(grid, out, nrow=len(columns), padding=2, pad_value=1.0)
    print(f"{out}: rows = images, columns = original | masked | reconstruction at steps {', '.join(map(str, steps))}")


def _labelled_grid(pictures, titles: list[str], out: Path) -> None:
    """``pictures`` ``(rows * columns, 3, H, W)`` in [0, 1], row-major, drawn at one screen pixel per picture pixel
    with a title over each column. Full colour: a palette would band the smooth reconstructions into blotches that
    the model did not draw (4 rows of 5 pictures of 192 px: about 140 KB)."""
    columns = len(titles)
    rows = pictures.shape[0] // columns
    height, width = pictures.shape[-2:]
    dpi, gap, top = 100, 4, 22  # pixels
    figure = _figure((columns * (width + gap) - gap) / dpi, (rows * (height + gap) - gap + top) / dpi)
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        left = column * (width + gap) / (columns * (width + gap) - gap)
        bottom = 1 - (top + row * (height + gap) + height) / (rows * (height + gap) - gap + top)
        axes = figure.add_axes((left, bottom, width / (columns * (width + gap) - gap),
                                height / (rows * (height + gap) - gap + top)))
        axes.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
        axes.set_axis_off()
        if row == 0:
            axes.set_title(titles[column], fontsize=10, pad=4)
    figure.savefig(out, dpi=dpi)


def curves(run: Path, out: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held = [(r["step"], r["holdout_loss"]) for r in records if "holdout_loss" in r]
    figure = _figure(7.0, 3.6)
    axes = figure.add_subplot()
    axes.plot(*zip(*loss), label="training loss (mean over the logging interval)")
    # the run measures the held-out loss at its start and its end only: points, not a line
    axes.plot(*zip(*held), "o", markersize=8, label="held-out loss (fixed held-out images and masks)")
    for step, value in held:
        axes.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(6, 6))
    axes.set_xlabel("step")
    axes.set_ylabel("SparK loss (per-patch normalised MSE)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"{out}: loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f} (step {loss[-1][0]}), "
          f"held-out {held[0][1]:.3f} -> {held[-1][1]:.3f}")


def read_bench_tables(text: str) -> dict[tuple[str, float], dict[str, dict[str, float]]]:
    """``sparkme-bench``'s printed tables -> ``{(model, ratio): {backend: {column header: value}}}`` (the last
    row of a configuration and backend wins)."""
    tables, header = {}, None
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == "model":
            header = cells
        elif header is not None and len(cells) == len(header) and not line.startswith(("#", "-", "[")):
            row = dict(zip(header, cells))
            values = {h: float(v) for h, v in row.items() if _number(v)}
            tables.setdefault((row["model"], float(row["ratio"])), {})[row["backend"]] = values
    return tables


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def speed(bench: Path, out: Path, title: str) -> None:
    tables = read_bench_tables(bench.read_text())
    keys = [k for k in tables if {"torch", "masked"} <= set(tables[k])]
    keys.sort(key=lambda k: (tables[k]["torch"]["vs ref"], k))
    figure = _figure(8.0, 0.42 * len(keys) + 2.2)
    axes = figure.add_subplot()
    bars = (("masked", "masked (no sparsity: fused LAMB, channels-last)", "#9aa5b1"),
            ("minkowski", "minkowski", "#6c8ebf"), ("torch", "torch", "#3f51b5"))
    height = 0.8 / len(bars)
    for i, key in enumerate(keys):
        for j, (backend, label, colour) in enumerate(bars):
            if backend in tables[key]:
                axes.barh(i + (j - 1) * height, tables[key][backend]["vs ref"], height, color=colour,
                          label=label if i == 0 else None)
        bound = tables[key]["torch"]["attain. vs ref"]
        axes.plot([bound, bound], [i - 0.45, i + 0.45], color="#d32f2f", linewidth=2,
                  label="bound: torch's step with its encoder at the ideal" if i == 0 else None)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(keys)), [f"{model} @ {ratio:g}" for model, ratio in keys])
    axes.set_xlabel("whole training step, speed-up against SparK's step (1 = SparK)")
    axes.grid(True, axis="x", alpha=0.3)
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1 * 11 / len(keys)), ncol=2)
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"{out}: {len(keys)} configurations from {bench}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("reconstruction", help="reconstruction grid at several steps of a run")
    one.add_argument("--run", type=Path, required=True)
    one.add_argument("--steps", type=int, nargs="+", required=True)
    one.add_argument("--images", type=int, default=4)
    one.add_argument("--scale", type=int, default=2, help="enlarge each picture this many times (nearest)")
    one.add_argument("--labels", action="store_true", help="a title over each column (original, masked, step N)")
    one.add_argument("--out", type=Path, required=True)
    two = commands.add_parser("curves", help="loss and held-out loss of a run")
    two.add_argument("--run", type=Path, required=True)
    two.add_argument("--out", type=Path, required=True)
    three = commands.add_parser("speed", help="whole-step speed-up bar chart from sparkme-bench output")
    three.add_argument("--bench", type=Path, required=True)
    three.add_argument("--out", type=Path, required=True)
    three.add_argument("--title", default="", help="e.g. the CPU and the settings of the benchmark")
    args = parser.parse_args(argv)
    if args.command == "reconstruction":
        reconstruction(args.run, args.steps, args.out, args.images, args.scale, args.labels)
    elif args.command == "curves":
        curves(args.run, args.out)
    else:
        speed(args.bench, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
