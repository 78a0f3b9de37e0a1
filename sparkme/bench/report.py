"""The benchmark's outputs: an aligned table on stdout, ``results.csv``, ``results.json`` and ``speedup.png``."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from sparkme.bench.settings import REFERENCE
from sparkme.bench.steps import REFERENCE_STEP

# Every row's keys, in the order of results.csv.
COLUMNS = [
    "model", "backend", "device", "image_size", "batch", "ratio", "visible_frac", "repeats", "warmup",
    "dense_layout", "dense_dtype",
    "enc_ms", "enc_spread", "step_spread", "enc_img_per_s", "enc_vs_masked",
    "enc_ideal", "enc_mem_bytes", "enc_mem_vs_masked",
    "step_ms", "step_img_per_s", "opt_ms", "dense_ms", "step_vs_masked", "step_attainable_vs_masked",
    "step_vs_reference", "step_attainable_vs_reference", "step_mem_bytes", "step_mem_vs_reference", "mem_kind",
    "enc_rss_bytes", "enc_rss_vs_masked", "step_rss_bytes", "step_rss_vs_reference",
]

# (header, key, format, scale) of the printed columns; the files hold every column.
TABLE = (
    ("model", "model", "", 1), ("backend", "backend", "", 1), ("batch", "batch", "d", 1), ("ratio", "ratio", "g", 1),
    ("step img/s", "step_img_per_s", ".2f", 1), ("vs ref", "step_vs_reference", ".2f", 1),
    ("attain. vs ref", "step_attainable_vs_reference", ".2f", 1), ("vs masked", "step_vs_masked", ".2f", 1),
    ("attain.", "step_attainable_vs_masked", ".2f", 1), ("dense ms", "dense_ms", ".0f", 1),
    ("opt ms", "opt_ms", ".0f", 1), ("step MiB", "step_mem_bytes", ".0f", 2**-20),
    ("mem vs ref", "step_mem_vs_reference", ".2f", 1), ("enc img/s", "enc_img_per_s", ".2f", 1),
    ("enc vs masked", "enc_vs_masked", ".2f", 1), ("ideal", "enc_ideal", ".2f", 1),
    ("enc MiB", "enc_mem_bytes", ".0f", 2**-20), ("enc mem vs masked", "enc_mem_vs_masked", ".2f", 1),
    ("step spread", "step_spread", ".0%", 1), ("enc spread", "enc_spread", ".0%", 1),
    ("step RSS MiB", "step_rss_bytes", ".0f", 2**-20), ("RSS vs ref", "step_rss_vs_reference", ".2f", 1),
    ("enc RSS MiB", "enc_rss_bytes", ".0f", 2**-20), ("enc RSS vs masked", "enc_rss_vs_masked", ".2f", 1),
)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``/proc/cpuinfo``'s ``model name``; ``platform.processor()``
    where there is no such file), with its count of logical CPUs: speed ratios depend on the CPU."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} logical CPUs"


def _cell(value, spec: str, scale: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value * scale if scale != 1 else value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Plain aligned text, one line per row; columns with no value in any row are left out."""
    columns = [c for c in TABLE if any(r[c[1]] is not None for r in rows)] if rows else list(TABLE)
    lines = [[_cell(r[key], spec, scale) for _, key, spec, scale in columns] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, (h, *_) in enumerate(columns)]

    def join(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([join([c[0] for c in columns]), join(["-" * w for w in widths]), *map(join, lines)])


def write_results(rows: Sequence[dict], out_dir: Path) -> None:
    """``results.csv``, ``results.json`` and ``speedup.png`` in ``out_dir`` (created when missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_model(), columns=COLUMNS)
    # NaN is not JSON: a ratio against a zero reference is written as null.
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    (out_dir / "results.json").write_text(json.dumps(dict(meta=meta, rows=clean), indent=2) + "\n")
    plot_speedup(rows, out_dir / "speedup.png")


def plot_speedup(rows: Sequence[dict], path: Path) -> None:
    """Speed-up over the mask ratio, one line per (model, backend): the whole step against the reference step
    (solid) when measured, the encoder against ``masked`` (dashed), and the encoder's ideal 1/(1-r)."""
    # The object API with the Agg canvas never touches pyplot's global backend (safe inside other programs).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    several_batches = len({r["batch"] for r in rows}) > 1
    for key, style, what in (("step_vs_reference", "-", "step"), ("enc_vs_masked", "--", "encoder")):
        lines: dict[tuple, list[tuple[float, float]]] = {}
        for row in rows:
            if row["backend"] not in (REFERENCE, REFERENCE_STEP) and row[key] is not None:
                name = (row["model"], row["backend"]) + ((f"batch {row['batch']}",) if several_batches else ())
                lines.setdefault(name, []).append((row["ratio"], row[key]))
        for name, points in lines.items():
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                      label=f"{' / '.join(map(str, name))} {what}")
    ratios = sorted({r["ratio"] for r in rows})
    if ratios:
        low, high = ratios[0], ratios[-1]
        grid = [low + (high - low) * i / 100 for i in range(101)] if high > low else [low]
        axes.plot(grid, [1.0 / (1.0 - r) for r in grid], "k:", marker=None if high > low else "x",
                  label="encoder ideal 1/(1-r)")
        axes.axhline(1.0, color="grey", linestyle=":")
    axes.set_xlabel("mask ratio (fraction of patches hidden)")
    axes.set_ylabel("speed-up")
    axes.set_title("step vs SparK's step (solid), encoder vs masked-dense (dashed)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
