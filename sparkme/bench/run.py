"""The benchmark loop: every model x batch size x mask ratio, all variants interleaved on the same inputs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from sparkme.bench import steps
from sparkme.bench.memory import release_memory, saved_activation_bytes
from sparkme.bench.peak_rss import peak_rss_delta
from sparkme.bench.report import format_table, write_results
from sparkme.bench.settings import REFERENCE, BenchSettings
from sparkme.bench.steps import REFERENCE_STEP, Variant
from sparkme.bench.timing import median_ms, spread, timed
from sparkme.masking import PATCH_SIZE, num_visible_of, random_grid_mask, random_mask
from sparkme.models.spark import SparK, dense_memory_format

SEED = 0


def run_benchmark(settings: BenchSettings) -> list[dict]:
    """Benchmark every backend on every model x batch size x mask ratio of ``settings`` (see the package docstring).

    Prints the table and, when ``settings.out_dir`` is given, writes ``results.csv``, ``results.json`` and
    ``speedup.png``. Each model's memory is given back before the next is built (``release_memory``), so a long list
    of models needs the memory of its largest, not of all.

    Returns:
        one dict per (model, batch, ratio, variant) with the keys of ``COLUMNS``: one row per backend, then (with
        the train step) the ``reference`` row, whose encoder columns are None. Values not measured are None.
    """
    device = settings.device
    all_variants = steps.variants(list(settings.backends), settings.dense_layout, settings.bf16)
    if not settings.include_train_step:
        all_variants = [v for v in all_variants if v.name != REFERENCE_STEP]
    rows: list[dict] = []
    for model_name in settings.models:
        torch.manual_seed(SEED)
        width = settings.decoder_width or steps.default_decoder_width(model_name)
        model = steps.build_model(model_name, device, width)
        for batch in settings.batch_sizes:
            optimizer = steps.make_optimizer(model, model_name, batch) if settings.include_train_step else None
            for ratio in settings.ratios:
                _progress(f"{model_name} batch {batch} ratio {ratio:g} on {device}")
                images, mask = _inputs(batch, ratio, settings.image_size, device, model)
                measured = _measure(model, optimizer, all_variants, images, mask, settings.repeats, settings.warmup)
                new_rows = _rows(model_name, all_variants, measured, images, ratio, settings.repeats, settings.warmup,
                                 cells=mask[0].numel())
                _progress("\n" + format_table(new_rows))  # long runs: each configuration's rows as soon as known
                rows += new_rows
                del images, mask, measured
            del optimizer
            release_memory(device)
        del model
        release_memory(device)
    print(format_table(rows), flush=True)
    if settings.out_dir is not None:
        write_results(rows, Path(settings.out_dir))
    return rows


def _inputs(batch: int, ratio: float, image_size: int, device: torch.device,
            model: SparK | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (volumes ``image_size``^3 for a 3-D model) and mask seeded by the configuration only, so every variant
    sees the very same data."""
    generator = torch.Generator().manual_seed(SEED + 1009 * batch + round(1000 * ratio))
    if model is not None and model.spatial_dims == 3:
        channels = model.decoder.proj.out_channels
        volumes = torch.randn(batch, channels, image_size, image_size, image_size, generator=generator)
        grid = (image_size // model.patch_size,) * 3
        return volumes.to(device), random_grid_mask(batch, grid, ratio, generator=generator).to(device)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    grid = image_size // PATCH_SIZE
    mask = random_mask(batch, grid, grid, ratio, generator=generator)
    return images.to(device), mask.to(device)


def _measure(model: SparK, optimizer: torch.optim.Optimizer | None, variants: list[Variant], images: torch.Tensor,
             mask: torch.Tensor, repeats: int, warmup: int) -> dict[str, dict[str, list[float] | int]]:
    """Per variant name: ``enc``/``step``/``opt`` seconds per repeat and ``enc_mem``/``step_mem`` bytes."""
    device = images.device
    out: dict[str, dict] = {v.name: dict(enc=[], step=[], opt=[], enc_mem=None, step_mem=None, enc_rss=None,
                                         step_rss=None) for v in variants}

    def visit(variant: Variant, record: bool) -> None:
        variant.apply(model, optimizer)
        if variant.name != REFERENCE_STEP:  # the reference step's encoder is masked's, timed in its own row
            seconds, peak = timed(lambda: steps.encoder_step(model, images, mask), device)
            if record:
                out[variant.name]["enc"].append(seconds)
                out[variant.name]["enc_mem"] = max(out[variant.name]["enc_mem"] or 0, peak or 0)
        if optimizer is not None:
            optimizer_seconds: list[float] = []
            seconds, peak = timed(lambda: optimizer_seconds.append(steps.train_step(model, optimizer, images, mask)),
                                  device)
            if record:
                out[variant.name]["step"].append(seconds)
                out[variant.name]["opt"].append(optimizer_seconds[0])
                out[variant.name]["step_mem"] = max(out[variant.name]["step_mem"] or 0, peak or 0)

    for _ in range(warmup):
        for variant in variants:
            visit(variant, record=False)
    for _ in range(repeats):
        for variant in variants:  # interleaved: drift of the machine hits every variant alike
            visit(variant, record=True)
    if device.type != "cuda":  # one untimed pass each with the saved-tensor hooks (they slow the forward down)
        exclude = [images, *model.parameters(), *model.buffers()]
        for variant in variants:
            variant.apply(model)
            if variant.name != REFERENCE_STEP:
                out[variant.name]["enc_mem"] = saved_activation_bytes(lambda: model.encoder(images, mask), exclude)
            if optimizer is not None:
                out[variant.name]["step_mem"] = saved_activation_bytes(lambda: [model(images, mask)], exclude)
            model.zero_grad(set_to_none=True)
        for variant in variants:  # and one more with the peak-RSS sampler, each from a trimmed heap
            variant.apply(model, optimizer)
            if variant.name != REFERENCE_STEP:
                release_memory(device)
                out[variant.name]["enc_rss"] = peak_rss_delta(lambda: steps.encoder_step(model, images, mask))
            if optimizer is not None:
                release_memory(device)
                out[variant.name]["step_rss"] = peak_rss_delta(lambda: steps.train_step(model, optimizer, images, mask))
    return out


def _rows(model_name: str, variants: list[Variant], measured: dict, images: torch.Tensor, ratio: float,
          repeats: int, warmup: int, cells: int) -> list[dict]:
    batch, device = images.shape[0], images.device
    visible = num_visible_of(cells, ratio) / cells  # ``cells`` patches per sample
    enc_ms = {name: median_ms(m["enc"]) for name, m in measured.items() if m["enc"]}
    step_ms = {name: median_ms(m["step"]) for name, m in measured.items() if m["step"]}
    reference_ms = step_ms.get(REFERENCE_STEP)
    # The attainable step: the encoder at its ideal (masked's time x the visible fraction), the rest as measured.
    ideal_enc_ms = enc_ms[REFERENCE] * visible
    rows = []
    for variant in variants:
        m = measured[variant.name]
        enc = enc_ms.get(variant.name)
        step = step_ms.get(variant.name)
        dense = None if step is None else step - enc_ms.get(variant.name, enc_ms[REFERENCE])
        attainable = None if dense is None else ideal_enc_ms + dense
        rows.append(dict(
            model=model_name, backend=variant.name, device=str(device), image_size=images.shape[-1], batch=batch,
            ratio=ratio, visible_frac=visible, repeats=repeats, warmup=warmup,
            dense_layout="channels_last" if dense_memory_format(variant.dense_layout, device) == torch.channels_last
            else "contiguous",
            dense_dtype=str(variant.dense_autocast or images.dtype).removeprefix("torch."),
            enc_ms=enc, enc_spread=spread(m["enc"]), step_spread=spread(m["step"]),
            enc_img_per_s=_rate(batch, enc), enc_vs_masked=_ratio(enc_ms[REFERENCE], enc),
            enc_ideal=None if enc is None else 1.0 / visible,
            enc_mem_bytes=m["enc_mem"], enc_mem_vs_masked=_ratio(m["enc_mem"], measured[REFERENCE]["enc_mem"]),
            step_ms=step, step_img_per_s=_rate(batch, step), opt_ms=median_ms(m["opt"]) if m["opt"] else None,
            dense_ms=dense, step_vs_masked=_ratio(step_ms.get(REFERENCE), step),
            step_attainable_vs_masked=_ratio(step_ms.get(REFERENCE), attainable),
            step_vs_reference=_ratio(reference_ms, step), step_attainable_vs_reference=_ratio(reference_ms, attainable),
            step_mem_bytes=m["step_mem"],
            step_mem_vs_reference=_ratio(m["step_mem"], measured.get(REFERENCE_STEP, {}).get("step_mem")),
            mem_kind="cuda_peak_delta" if device.type == "cuda" else "cpu_saved_tensors",
            enc_rss_bytes=m["enc_rss"], enc_rss_vs_masked=_ratio(m["enc_rss"], measured[REFERENCE]["enc_rss"]),
            step_rss_bytes=m["step_rss"],
            step_rss_vs_reference=_ratio(m["step_rss"], measured.get(REFERENCE_STEP, {}).get("step_rss")),
        ))
    return rows


def _rate(batch: int, ms: float | None) -> float | None:
    return None if ms is None else 1000.0 * batch / ms


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` (a speed-up for reference time / time), None when either is missing, NaN for a
    zero denominator."""
    if numerator is None or denominator is None:
        return None
    return numerator / denominator if denominator else math.nan


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)  # stderr: stdout carries only notes and the table
