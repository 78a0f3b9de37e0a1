"""``sparkme-bench`` (also ``python tools/bench.py``): the command line of the benchmark."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

import torch

from sparkme.bench.report import cpu_model
from sparkme.bench.run import run_benchmark
from sparkme.bench.settings import DEFAULT_MODELS, DEFAULT_RATIOS, REFERENCE, BenchSettings
from sparkme.errors import run_reporting_usage_errors
from sparkme.masking import PATCH_SIZE
from sparkme.models.spark import DENSE_LAYOUTS
from sparkme.sparse.registry import BACKEND_NAMES

PROG = "sparkme-bench"


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
    import sparkme.bench

    parser = argparse.ArgumentParser(prog=PROG, description=sparkme.bench.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", type=_names, default=list(DEFAULT_MODELS), help="comma list of backbones")
    parser.add_argument("--backends", type=_names, default=list(BACKEND_NAMES),
                        help=f"comma list from {', '.join(BACKEND_NAMES)}; {REFERENCE} is always added")
    parser.add_argument("--ratios", type=_list_of(float, "mask ratios in [0, 1)"), default=list(DEFAULT_RATIOS))
    parser.add_argument("--batch-sizes", type=_list_of(int, "integers"), default=[8])
    parser.add_argument("--image-size", type=int, default=224,
                        help=f"square side, a multiple of {PATCH_SIZE} (3-D models: the cube's side, a multiple of "
                             "their patch size)")
    parser.add_argument("--decoder-width", type=_positive_int, default=None,
                        help="decoder's first width (default: 768 for images, 256 for volumes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the whole SparK training step and the reference step")
    parser.add_argument("--dense-layout", default="auto", choices=DENSE_LAYOUTS,
                        help="memory format of densify + decoder in the backends' steps (reference: contiguous)")
    parser.add_argument("--bf16", action="store_true",
                        help="opt-in: densify + decoder under bf16 autocast in the backends' steps (changes the maths)")
    parser.add_argument("--out", default="bench_results", help="folder for results.csv/json and speedup.png")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    return parser


def _run(args: argparse.Namespace) -> None:
    settings = BenchSettings(  # checked before any work: a typo fails in a second
        args.models, args.backends, args.ratios, args.batch_sizes, args.image_size, args.repeats, args.warmup,
        args.device, args.train_step, args.out, args.dense_layout, args.bf16, args.decoder_width)
    if args.repeats < 3:
        print(f"note: --repeats {args.repeats} < 3: the medians are noisy", flush=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}", flush=True)
    print(f"torch {torch.__version__}, device {settings.device}, {torch.get_num_threads()} threads, "
          f"image {args.image_size}px, {args.repeats} repeats after {args.warmup} warm-up", flush=True)
    run_benchmark(settings)
    print(f"wrote results.csv, results.json and speedup.png to {args.out}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Bad settings end as one line ``sparkme-bench: error: ...`` and exit status 2, before any work."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] in (["loader"], ["soak"]):  # the data loader's and the long run's own (sparkme.bench.loader, .soak)
        return importlib.import_module(f"sparkme.bench.{words[0]}").main(words[1:])
    args = build_parser().parse_args(argv)
    run_reporting_usage_errors(PROG, lambda: _run(args))
    return 0
