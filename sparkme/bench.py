"""Throughput and memory of the sparse backends against the ``masked`` reference, in one process.

    python tools/bench.py --models resnet50,convnext_tiny --ratios 0.6,0.75,0.9 --batch-sizes 16

For every model x batch size x mask ratio, each backend's encoder runs forward + backward (loss = sum of the means
of the 4 feature maps) on the *same* seeded images and mask. Backends are interleaved (every repeat runs each
backend once, in turn) so that drift of the machine (clock boost, thermal state, other load) hits all of them alike,
and the reported throughput is the median over the repeats after warm-up. When ``sparkme.models.spark.build_spark``
exists, a full SparK training step (forward + backward + AdamW step) is timed the same way.

Peak memory means:
  * CUDA: ``torch.cuda.max_memory_allocated`` during the timed fwd+bwd minus the memory allocated just before it
    (the maximum over the repeats);
  * CPU: the bytes of the tensors held for backward at the end of the forward pass (the activation memory, whose
    peak is there): every tensor saved through ``torch.autograd.graph.saved_tensors_hooks`` plus tensors that
    custom autograd Functions stash on their ``ctx`` (MinkowskiEngine does, bypassing the hooks), each storage
    counted once (deduplicated by ``data_ptr``), parameters, buffers and the input images excluded. Copies made in
    the forward and kept for backward count (im2col columns, MinkowskiEngine's re-laid-out kernels): on a GPU they
    would count as well. Memory the graph does not hold (e.g. the coordinate maps inside MinkowskiEngine's C++
    coordinate manager) is not seen. It is measured in one extra, untimed pass per backend, since
    the hooks slow the forward down.

Results: a table on stdout, ``results.csv``, ``results.json`` and ``speedup.png`` in the output folder.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparkme.masking import PATCH_SIZE, check_image_size, check_mask_ratio, num_visible, random_mask
from sparkme.models.encoder import SparseEncoder
from sparkme.sparse.registry import BACKEND_NAMES, get_backend

REFERENCE = "masked"
DEFAULT_MODELS = ("resnet50", "convnext_tiny")
DEFAULT_RATIOS = (0.0, 0.6, 0.75, 0.9)
SEED = 0
TRAIN_LR = 1.5e-4

COLUMNS = [
    "model", "backend", "device", "image_size", "batch", "ratio", "visible_frac", "repeats", "warmup",
    "step_ms", "img_per_s", "speedup_vs_masked", "ideal_speedup", "mem_kind", "mem_bytes", "mem_vs_masked",
    "train_step_ms", "train_img_per_s", "train_speedup_vs_masked",
]


# --- validation ---------------------------------------------------------------------------------------------------
def _torchvision_resnets() -> list[str]:
    import torchvision.models as tvm

    return sorted(n for n in dir(tvm) if n.startswith("resnet") and n[len("resnet"):].isdigit())


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)


def check_model_name(name: str) -> str:
    """Return ``name`` or raise ValueError unless it is a torchvision/timm ResNet or a timm ConvNeXt."""
    known = (name.startswith("resnet") and (name in _torchvision_resnets() or _timm_has(name))) or (
        name.startswith("convnext") and _timm_has(name))
    if not known:
        raise ValueError(
            f"unknown model {name!r}; choose a ResNet ({', '.join(_torchvision_resnets())} from torchvision, or "
            "a timm resnet* name) or a timm ConvNeXt (e.g. convnext_atto, convnext_tiny, convnextv2_atto; "
            "see timm.list_models('convnext*'))"
        )
    return name


def check_backends(backends: Sequence[str]) -> list[str]:
    """Deduplicated backends in the given order, with ``masked`` appended when missing (it is the reference).

    Raises:
        ValueError: an unknown name (the message lists the choices).
        ImportError: a backend whose library is missing (the message says how to install it).
    """
    names: list[str] = []
    for name in backends:
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
        if name not in names:
            names.append(name)
    if REFERENCE not in names:
        names.append(REFERENCE)
    for name in names:
        get_backend(name)
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available, else cpu; raise ValueError for an unusable device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {str(device)!r}; choose auto, cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; choose auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; choose auto or cpu")
    return resolved


def validate(
    models: Sequence[str],
    backends: Sequence[str],
    ratios: Sequence[float],
    batch_sizes: Sequence[int],
    image_size: int,
    repeats: int,
    warmup: int,
) -> tuple[list[str], list[str], list[float], list[int]]:
    """Check every setting before any model is built, so a typo fails in a second, not after a long run."""
    if not models:
        raise ValueError("no model given; pass at least one, e.g. resnet50")
    if not ratios:
        raise ValueError("no mask ratio given; pass at least one in [0, 1), e.g. 0.75")
    if not batch_sizes:
        raise ValueError("no batch size given; pass at least one integer >= 1")
    models = [check_model_name(m) for m in dict.fromkeys(models)]
    backends = check_backends(backends)
    ratios = [check_mask_ratio(r) for r in dict.fromkeys(ratios)]
    for batch in batch_sizes:
        if int(batch) != batch or batch < 1:
            raise ValueError(f"batch size must be an integer >= 1, got {batch}")
    check_image_size(image_size, image_size)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return models, backends, ratios, [int(b) for b in dict.fromkeys(batch_sizes)]


# --- models -------------------------------------------------------------------------------------------------------
def build_dense_model(name: str) -> nn.Module:
    """A randomly initialised dense backbone: torchvision for the ResNets it has, timm for everything else."""
    check_model_name(name)
    if name in _torchvision_resnets():
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def load_build_spark() -> tuple[Callable[[str, str], nn.Module] | None, str]:
    """``(sparkme.models.spark.build_spark, "")`` or ``(None, why it is unavailable)``."""
    try:
        module = importlib.import_module("sparkme.models.spark")
    except ImportError as error:
        return None, f"sparkme.models.spark is not importable ({error})"
    build = getattr(module, "build_spark", None)
    if not callable(build):
        return None, "sparkme.models.spark has no build_spark(model_name, backend)"
    return build, ""


# --- measurement --------------------------------------------------------------------------------------------------
def _encoder_step(encoder: nn.Module, images: torch.Tensor, mask: torch.Tensor) -> None:
    features = encoder(images, mask)
    loss = sum(f.mean() for f in features)
    loss.backward()
    encoder.zero_grad(set_to_none=True)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, mask: torch.Tensor) -> None:
    loss = model(images, mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(step: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    """Seconds one call of ``step`` takes, and on CUDA its peak memory above what was allocated before it."""
    if device.type != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start, None
    torch.cuda.synchronize(device)  # nothing queued from before may be billed to this step
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start_event = torch.cuda.Event(enable_timing=True)
    end_event = torch.cuda.Event(enable_timing=True)
    start_event.record()
    step()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event) / 1000.0, torch.cuda.max_memory_allocated(device) - before


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(data_ptr, nbytes)`` of the storage behind ``tensor`` (views share it), None when it has none."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / wrapper tensors without one plain storage
        return None
    return storage.data_ptr(), storage.nbytes()


def _graph_nodes(outputs: Iterable[torch.Tensor]) -> Iterable[Any]:
    seen: set[int] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(parent for parent, _ in node.next_functions)


def saved_activation_bytes(
    forward: Callable[[], Sequence[torch.Tensor]], exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes of the distinct storages that ``forward()`` keeps alive for backward (see the module docstring).

    Args:
        forward: runs the forward pass and returns its output tensors (their graph is walked, then dropped).
        exclude: tensors not to count (parameters, buffers, inputs: they exist with or without the pass).
    """
    excluded = {key[0] for key in map(_storage_key, exclude) if key is not None}
    counted: dict[int, int] = {}

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            key = _storage_key(value)
            if key is not None and key[0] != 0 and key[0] not in excluded:
                counted[key[0]] = key[1]
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        add(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = forward()
    # Custom autograd Functions may keep tensors as ctx attributes instead of save_for_backward (MinkowskiEngine
    # does); the hooks never see those, but the ctx *is* the graph node, so its attributes can be read there.
    for node in _graph_nodes(outputs):
        for value in getattr(node, "__dict__", {}).values():
            add(value)
    return sum(counted.values())


def _inputs(batch: int, ratio: float, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and mask seeded by the configuration only, so every backend sees the very same data."""
    seed = SEED + 1009 * batch + round(1000 * ratio)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    grid = image_size // PATCH_SIZE
    mask = random_mask(batch, grid, grid, ratio, generator=generator)
    return images.to(device), mask.to(device)


def _median_rate(batch: int, seconds: list[float]) -> tuple[float, float]:
    """``(median step ms, median img/s)``."""
    return 1000.0 * statistics.median(seconds), statistics.median(batch / s for s in seconds)


def run_benchmark(
    models: Sequence[str],
    backends: Sequence[str],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    batch_sizes: Sequence[int] = (16,),
    image_size: int = 224,
    repeats: int = 5,
    warmup: int = 2,
    device: str | torch.device | None = None,
    include_train_step: bool = True,
    out_dir: str | Path | None = "bench_results",
) -> list[dict]:
    """Benchmark every backend on every model x batch size x mask ratio; see the module docstring.

    Prints the table, and when ``out_dir`` is given writes ``results.csv``, ``results.json`` and ``speedup.png``
    there. ``repeats=1, warmup=0`` is allowed (for smoke tests); real numbers want ``repeats >= 5``.

    Returns:
        one dict per (model, batch, ratio, backend) with the keys of ``COLUMNS``; train-step values are None when
        the step was not measured.
    """
    models, backends, ratios, batch_sizes = validate(models, backends, ratios, batch_sizes, image_size, repeats,
                                                     warmup)
    device = resolve_device(device)
    build_spark = None
    if include_train_step:
        build_spark, why = load_build_spark()
        if build_spark is None:
            print(f"note: skipping the SparK train-step columns: {why}", flush=True)

    rows: list[dict] = []
    for model_name in models:
        torch.manual_seed(SEED)
        dense = build_dense_model(model_name)
        # Every backend converts the same dense model, so all start from identical weights.
        encoders = {b: SparseEncoder.from_dense(dense, backend=b).to(device).train() for b in backends}
        del dense
        trainers: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        if build_spark is not None:
            for backend in backends:
                torch.manual_seed(SEED)  # same initial SparK weights for every backend
                spark = build_spark(model_name, backend).to(device).train()
                trainers[backend] = (spark, torch.optim.AdamW(spark.parameters(), lr=TRAIN_LR))
        for batch in batch_sizes:
            for ratio in ratios:
                _progress(f"{model_name} batch {batch} ratio {ratio:g} on {device}")
                images, mask = _inputs(batch, ratio, image_size, device)
                rows += _measure_configuration(model_name, encoders, trainers, images, mask, ratio, repeats, warmup,
                                               device)
        del encoders, trainers
        gc.collect()

    print(format_table(rows), flush=True)
    if out_dir is not None:
        write_results(rows, Path(out_dir))
    return rows


def _measure_configuration(
    model_name: str,
    encoders: dict[str, nn.Module],
    trainers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    images: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> list[dict]:
    backends = list(encoders)
    batch = images.shape[0]

    def encoder_step(backend: str) -> Callable[[], None]:
        return lambda: _encoder_step(encoders[backend], images, mask)

    def train_step(backend: str) -> Callable[[], None]:
        return lambda: _train_step(*trainers[backend], images, mask)

    for _ in range(warmup):
        for backend in backends:
            encoder_step(backend)()
            if trainers:
                train_step(backend)()
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    train_seconds: dict[str, list[float]] = {b: [] for b in backends}
    memory: dict[str, int] = {}
    for _ in range(repeats):
        for backend in backends:  # interleaved: each repeat visits every backend once
            elapsed, peak = _timed(encoder_step(backend), device)
            seconds[backend].append(elapsed)
            if peak is not None:
                memory[backend] = max(memory.get(backend, 0), peak)
            if trainers:
                train_seconds[backend].append(_timed(train_step(backend), device)[0])
    if device.type != "cuda":
        for backend, encoder in encoders.items():
            exclude = [images, *encoder.parameters(), *encoder.buffers()]
            memory[backend] = saved_activation_bytes(lambda encoder=encoder: encoder(images, mask), exclude)

    grid = images.shape[-1] // PATCH_SIZE
    rates = {b: _median_rate(batch, seconds[b]) for b in backends}
    train_rates = {b: _median_rate(batch, train_seconds[b]) for b in backends} if trainers else {}
    rows = []
    for backend in backends:
        step_ms, img_per_s = rates[backend]
        reference = backend == REFERENCE
        row = dict(
            model=model_name, backend=backend, device=str(device), image_size=images.shape[-1], batch=batch,
            ratio=ratio, visible_frac=num_visible(grid, grid, ratio) / (grid * grid), repeats=repeats, warmup=warmup,
            step_ms=step_ms, img_per_s=img_per_s,
            speedup_vs_masked=1.0 if reference else img_per_s / rates[REFERENCE][1],
            ideal_speedup=1.0 / (1.0 - ratio),
            mem_kind="cuda_peak_delta" if device.type == "cuda" else "cpu_saved_tensors",
            mem_bytes=memory[backend],
            mem_vs_masked=1.0 if reference else _ratio(memory[backend], memory[REFERENCE]),
            train_step_ms=None, train_img_per_s=None, train_speedup_vs_masked=None,
        )
        if trainers:
            row["train_step_ms"], row["train_img_per_s"] = train_rates[backend]
            row["train_speedup_vs_masked"] = 1.0 if reference else (
                row["train_img_per_s"] / train_rates[REFERENCE][1])
        rows.append(row)
    return rows


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else math.nan


def _progress(message: str) -> None:
    # stderr, so stdout carries only the notes and the table
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- output -------------------------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    """Plain aligned text, one line per row."""
    header = ["model", "backend", "batch", "ratio", "img/s", "vs masked", "ideal", "mem MiB", "mem vs masked",
              "train img/s", "train vs masked"]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [[
        r["model"], r["backend"], str(r["batch"]), f"{r['ratio']:g}", number(r["img_per_s"], ".2f"),
        number(r["speedup_vs_masked"], ".2f"), number(r["ideal_speedup"], ".2f"),
        number(r["mem_bytes"] / 2**20, ".1f"), number(r["mem_vs_masked"], ".2f"),
        number(r["train_img_per_s"], ".2f"), number(r["train_speedup_vs_masked"], ".2f"),
    ] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    text = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    text.append("  ".join("-" * w for w in widths))
    for line in lines:
        text.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(text)


def write_results(rows: Sequence[dict], out_dir: Path) -> None:
    """``results.csv``, ``results.json`` and ``speedup.png`` in ``out_dir`` (created when missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in COLUMNS} for row in rows)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), columns=COLUMNS)
    # NaN is not JSON: a memory ratio against a zero reference is written as null.
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    (out_dir / "results.json").write_text(json.dumps(dict(meta=meta, rows=clean), indent=2) + "\n")
    plot_speedup(rows, out_dir / "speedup.png")


def plot_speedup(rows: Sequence[dict], path: Path) -> None:
    """Throughput ratio vs ``masked`` over the mask ratio, one line per (model, backend), and the ideal 1/(1-r)."""
    # The object API with the Agg canvas never touches pyplot's global backend (safe inside other programs).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    several_batches = len({r["batch"] for r in rows}) > 1
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for row in rows:
        if row["backend"] != REFERENCE:
            key = (row["model"], row["backend"], row["batch"]) if several_batches else (row["model"], row["backend"])
            lines.setdefault(key, []).append((row["ratio"], row["speedup_vs_masked"]))
    for key, points in lines.items():
        points.sort()
        label = " / ".join(str(k) if i < 2 else f"batch {k}" for i, k in enumerate(key))
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ratios = sorted({r["ratio"] for r in rows})
    if ratios:
        low, high = ratios[0], ratios[-1]
        grid = [low + (high - low) * i / 100 for i in range(101)] if high > low else [low]
        axes.plot(grid, [1.0 / (1.0 - r) for r in grid], "k--", marker=None if high > low else "x",
                  label="ideal 1/(1-r)")
        axes.axhline(1.0, color="grey", linestyle=":", label=f"{REFERENCE} (reference)")
    axes.set_xlabel("mask ratio (fraction of patches hidden)")
    axes.set_ylabel(f"throughput / {REFERENCE} throughput")
    axes.set_title("encoder fwd+bwd speed-up over masked-dense")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --- command line -------------------------------------------------------------------------------------------------
def _list_of(kind: type, what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None

    return parse


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", type=_names, default=list(DEFAULT_MODELS), help="comma list of backbones")
    parser.add_argument("--backends", type=_names, default=list(BACKEND_NAMES),
                        help=f"comma list from {', '.join(BACKEND_NAMES)}; {REFERENCE} is always added")
    parser.add_argument("--ratios", type=_list_of(float, "mask ratios in [0, 1)"), default=list(DEFAULT_RATIOS))
    parser.add_argument("--batch-sizes", type=_list_of(int, "integers"), default=[16])
    parser.add_argument("--image-size", type=int, default=224, help=f"square side, a multiple of {PATCH_SIZE}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per backend first")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a full SparK step (when sparkme.models.spark.build_spark exists)")
    parser.add_argument("--out", default="bench_results", help="folder for results.csv/json and speedup.png")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # bad settings are usage errors: report them before any work, with argparse's exit status 2
        validate(args.models, args.backends, args.ratios, args.batch_sizes, args.image_size, args.repeats,
                 args.warmup)
        device = resolve_device(args.device)
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    if args.repeats < 5:
        print(f"note: --repeats {args.repeats} < 5: the medians are noisy", flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"image {args.image_size}px, {args.repeats} repeats after {args.warmup} warm-up", flush=True)
    run_benchmark(args.models, args.backends, args.ratios, args.batch_sizes, args.image_size, args.repeats,
                  args.warmup, device, args.train_step, args.out)
    print(f"wrote results.csv, results.json and speedup.png to {args.out}", flush=True)
    return 0
