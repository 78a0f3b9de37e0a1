"""``sparkme-bench loader``: how many images per second one data-loader worker decodes and augments at SparK's
224 px pretraining augmentation, and how many workers per GPU that takes.

    sparkme-bench loader --images 200 --seconds 10

It writes ``--images`` JPEGs (crops of scikit-image's photos at ImageNet's typical 500 x 375, quality 90) as a
folder and as shards, then, in this one process with one torch thread (as a worker has), times in turn:

- ``folder``: the folder loader's item (``ImageFolderDataset`` under ``SeededItems``: file read, PIL decode, crop);
- ``shards``: the shard stream (tar read, PIL decode, crop) of ``data=shards``;
- the decoders on the same JPEG bytes followed by the same augmentation: PIL, ``torchvision.io.decode_jpeg``
  (libjpeg-turbo) and ``simplejpeg`` when it is installed.

Variants are interleaved round after round (drift hits all alike); the median of the rounds' rates is reported with
its spread, and for each the workers per GPU that feed SparK's published rate (about 185 img/s per A100 for
ResNet-50) and a step ``--faster`` times as fast.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparkme.bench.report import cpu_model
from sparkme.errors import UsageError, run_reporting_usage_errors

PROG = "sparkme-bench loader"
SPARK_A100_IMG_PER_S = 185.0  # ResNet-50, 800 epochs at batch 4096 in about 48 h on 32 A100 (DESIGN.md section 9)
IMAGE_SIZE = 224


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of 500 x 375 (crops of scikit-image's photos, resized), quality 90."""
    from sparkme.data.samples import TRAIN_PHOTOS, _load_rgb

    rng = np.random.default_rng(seed)
    photos = [_load_rgb(name) for name in TRAIN_PHOTOS]
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        side = int(min(width, height) * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        image = photo.crop((left, top, left + side, top + int(side * 0.75))).resize((500, 375), Image.BICUBIC)
        path = folder / f"{index:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def _decoders() -> dict[str, Callable[[bytes], object]]:
    """JPEG bytes -> what ``pretrain_transform`` takes (a PIL image or a uint8 ``(3, H, W)`` tensor)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from sparkme.data.imagefolder import read_rgb

    decoders = {
        "pil": lambda raw: read_rgb(io.BytesIO(raw)),
        "torchvision": lambda raw: decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                                               mode=ImageReadMode.RGB),
    }
    try:
        import simplejpeg

        decoders["simplejpeg"] = lambda raw: torch.from_numpy(simplejpeg.decode_jpeg(raw, colorspace="RGB")) \
            .permute(2, 0, 1)
    except ImportError:
        pass
    return decoders


def _variants(folder: Path, shards: str) -> dict[str, Callable[[], int]]:
    """Each variant: a call that decodes and augments the next images, returning how many."""
    from sparkme.data.imagefolder import ImageFolderDataset
    from sparkme.data.sampling import SeededItems
    from sparkme.data.shards import ShardImages
    from sparkme.data.shards.stream import DECODERS
    from sparkme.data.transforms import pretrain_transform

    transform = pretrain_transform(IMAGE_SIZE)
    items = SeededItems(ImageFolderDataset(str(folder), transform), seed=0)
    streams = {name: ShardImages(shards, transform, shuffle_buffer=64, decoder=name) for name in DECODERS}
    raws = [path.read_bytes() for path in sorted(folder.glob("*.jpg"))]
    count = len(raws)

    def folder_pass() -> int:
        for index in range(count):
            items[(0, index)]
        return count

    def shards_pass(stream: ShardImages) -> int:
        return sum(len(batch) for batch in stream.epoch_loader(1, 1, 0, 0, 0, 0, 1))

    variants = {"folder (PIL)": folder_pass}
    for name, stream in streams.items():
        variants[f"shards ({name})"] = lambda stream=stream: shards_pass(stream)
    for name, decode in _decoders().items():
        def decode_pass(decode=decode) -> int:
            for raw in raws:
                transform(decode(raw))
            return count

        variants[f"bytes ({name})"] = decode_pass
    return variants


def measure(images: int, seconds: float, faster: Sequence[float]) -> list[dict]:
    """Rates of every variant (img/s per worker): median and spread over rounds of about ``seconds`` in all."""
    from sparkme.data.shards.writer import write_shards

    with tempfile.TemporaryDirectory() as temporary:
        folder, out = Path(temporary) / "folder", Path(temporary) / "shards"
        folder.mkdir()
        write_photos(folder, images)
        write_shards(folder, out, per_shard=max(1, images // 4))
        variants = _variants(folder, str(out / "train-*.tar"))
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for run in variants.values():  # warm-up
            run()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or min(len(r) for r in rates.values()) < 3:
            for name, run in variants.items():
                started = time.perf_counter()
                done = run()
                rates[name].append(done / (time.perf_counter() - started))
    rows = []
    for name, measured in rates.items():
        median = statistics.median(measured)
        row = {"variant": name, "img_per_s": median, "min": min(measured), "max": max(measured),
               "rounds": len(measured)}
        for factor in (1.0, *faster):
            row[f"workers_for_{factor:g}x"] = math.ceil(SPARK_A100_IMG_PER_S * factor / median)
        rows.append(row)
    return rows


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=_positive(int), default=200, help="JPEGs written and read per round")
    parser.add_argument("--seconds", type=_positive(float), default=20.0, help="time spent measuring, about")
    parser.add_argument("--faster", type=_positive(float), nargs="*", default=[2.0, 3.0],
                        help="step speed-ups over SparK's to size workers for")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.images < 4:
            raise UsageError(f"--images must be at least 4 (one per shard of 4), got {args.images}")
        torch.set_num_threads(1)  # what a data-loader worker has
        print(f"CPU: {cpu_model()}; 1 torch thread; {IMAGE_SIZE} px; {args.images} JPEGs 500x375 q90", flush=True)
        rows = measure(args.images, args.seconds, args.faster)
        factors = [1.0, *args.faster]
        header = ["variant", "img/s per worker (median)", "spread", *[f"workers for {SPARK_A100_IMG_PER_S * f:g} "
                                                                       "img/s" for f in factors]]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            cells = [row["variant"], f"{row['img_per_s']:.0f}", f"{row['min']:.0f}-{row['max']:.0f} "
                     f"({row['rounds']} rounds)", *[str(row[f"workers_for_{f:g}x"]) for f in factors]]
            print("| " + " | ".join(cells) + " |", flush=True)

    run_reporting_usage_errors(PROG, run)
    return 0
