"""Pretraining images streamed from WebDataset tar shards (``data=shards``), with the folder loader's guarantees:
every rank runs the same number of steps, and the data of a step depends only on the step, so ``kill -9`` +
``resume=auto`` repeats exactly what an uninterrupted run reads (``sparkme.data.shards.layout`` says who reads
what).

A resume replays the interrupted stream's shuffle buffer on sample positions (known from the manifest) and reads
the samples it already handed out without decoding them. A sample that cannot be decoded (or is missing from a
damaged shard) is replaced by the stream's next readable sample, counted and logged by its worker.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from sparkme.data.imagefolder import read_rgb
from sparkme.data.shards.layout import StreamPlan, rank_streams
from sparkme.data.shards.manifest import shard_sizes
from sparkme.data.shards.sources import expand_urls
from sparkme.data.shards.tar_samples import iter_samples
from sparkme.errors import UsageError

log = logging.getLogger(__name__)


def seeded(seed: int, epoch: int, position: int, make):
    """``make()`` under the per-item seeding of ``sparkme.data.sampling.SeededItems`` (torch's CPU and Python's RNG),
    the global RNG states untouched. The CPU generator is seeded directly: ``torch.manual_seed`` under
    ``fork_rng`` costs about 5 ms an item here, half the augmentation's time."""
    item_seed = (seed * 1_000_003 + epoch * 100_003 + position) % 2**63
    python_state, torch_state = random.getstate(), torch.default_generator.get_state()
    try:
        torch.default_generator.manual_seed(item_seed)
        random.seed(item_seed)
        return make()
    finally:
        random.setstate(python_state)
        torch.default_generator.set_state(torch_state)


JPEG_START = b"\xff\xd8"
DECODERS = ("pil", "torchvision")


def decode(raw: bytes | None, decoder: str = "pil"):
    """The RGB image of ``raw`` and None, or None and the reason it is not one. ``decoder="torchvision"`` decodes
    JPEGs with ``torchvision.io.decode_jpeg`` into a uint8 ``(3, H, W)`` tensor (libjpeg-turbo: about 1.5x PIL's
    rate here, ``sparkme-bench loader``), other formats and JPEGs it refuses with PIL."""
    if raw is None:
        return None, "missing (damaged shard or no image member)"
    if decoder == "torchvision" and raw.startswith(JPEG_START):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB), None
        except RuntimeError:
            pass  # PIL's verdict decides (and names the error)
    try:
        return read_rgb(io.BytesIO(raw)), None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a broken file
        return None, f"{type(error).__name__}: {error}"


class ShardImages(Dataset):
    """The images of WebDataset shards; labels and other members are ignored (pretraining needs none).

    Args:
        urls: shard addresses: paths, brace patterns, globs, ``pipe:<command>`` (``sparkme.data.shards.sources``).
        transform: PIL image -> tensor.
        manifest: samples per shard (``manifest.json``); None: the one beside local shards, or count them.
        shuffle_buffer: samples each worker's shuffle buffer holds (memory: this many encoded images).
        seed: the run's seed (the order of shards and the shuffle buffers).
        decoder: ``pil``, or ``torchvision`` for JPEGs as uint8 tensors (``transform`` must take both).
    """

    def __init__(self, urls: str | Sequence[str] | None, transform, manifest: str | None = None,
                 shuffle_buffer: int = 2000, seed: int = 0, decoder: str = "pil"):
        if not urls:
            raise UsageError("data=shards needs data.urls=<shards> (paths, a brace pattern like "
                             "/data/train-{000000..001281}.tar, or pipe:<command>)")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise UsageError(f"data.shuffle_buffer must be an integer >= 1 (samples), got {shuffle_buffer!r}")
        if decoder not in DECODERS:
            raise UsageError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.urls = expand_urls(urls)
        self.sizes = shard_sizes(self.urls, manifest)
        if sum(self.sizes) == 0:
            raise UsageError(f"data.urls {urls!r}: the {len(self.urls)} shard(s) hold no sample")
        self.transform, self.shuffle_buffer, self.seed, self.decoder = transform, shuffle_buffer, seed, decoder

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int):
        """Sample ``index`` of the shards in their given order (the first readable one from there): for the few
        fixed images a run shows; training reads ``epoch_loader``'s streams."""
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            shard = 0
            while position >= self.sizes[shard]:
                position, shard = position - self.sizes[shard], shard + 1
            for _, members in iter_samples(self.urls[shard], skip=position, take=1):
                image, _ = decode(members.get("image"), self.decoder)
                if image is not None:
                    return self.transform(image)
        raise RuntimeError(f"no readable image in the {len(self.urls)} shard(s)")

    def epoch_loader(self, batch: int, accum: int, workers: int, epoch: int, start: int, rank: int, world: int,
                     generator: torch.Generator | None = None) -> DataLoader:
        """Rank ``rank``'s batches of ``epoch`` from its ``start``-th sample on (a multiple of ``batch``).

        Raises:
            UsageError: more workers than a rank has batches in an epoch (a worker would get nothing to read).
        """
        rank_batches = check_workers(len(self), len(self.urls), batch, accum, workers, world)
        streams = max(1, workers)
        plans = rank_streams(self.sizes, self.seed, epoch, rank, rank_batches, batch, streams, self.shuffle_buffer)
        stream = EpochStream(self, plans, epoch, start // batch, batch)
        return DataLoader(stream, batch_size=batch, drop_last=True, num_workers=workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available(), generator=generator)


def check_workers(samples: int, shards: int, batch: int, accum: int, workers: int, world: int) -> int:
    """The batches each of ``world`` ranks reads per epoch from ``samples`` images in ``shards`` shards.

    Raises:
        UsageError: more workers than a rank has batches in an epoch (a worker would get nothing to read).
    """
    rank_batches = samples // world // (batch * accum) * accum
    if rank_batches < max(1, workers):
        raise UsageError(f"data.num_workers={workers} is more than the {rank_batches} batch(es) each of the "
                         f"{world} rank(s) reads per epoch from {samples} samples in {shards} "
                         "shard(s): some workers would get nothing; lower data.num_workers or trainer.batch_size")
    return rank_batches


class EpochStream(IterableDataset):
    """One rank's images of one epoch from batch ``start_batch`` on: worker w of the loader plays stream
    ``(start_batch + w) mod W``, so that the loader, which takes batches from its workers in turn starting with
    worker 0, hands out batch k from stream ``k mod W`` however far into the epoch it starts."""

    def __init__(self, images: ShardImages, plans: list[StreamPlan], epoch: int, start_batch: int, batch: int):
        self.images, self.plans, self.epoch, self.start_batch, self.batch = images, plans, epoch, start_batch, batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        stream = (self.start_batch + worker) % len(self.plans)
        done = len(range(stream, self.start_batch, len(self.plans))) * self.batch  # handed out before the resume
        return self._images(self.plans[stream], done)

    def _images(self, plan: StreamPlan, done: int) -> Iterator[torch.Tensor]:
        reader = _PositionReader(self.images.urls, plan, skip=set(plan.order[:done]))
        bad = 0
        for index in range(done, len(plan.order)):
            position = plan.order[index]
            image, why = decode(reader.raw(position), self.images.decoder)
            if image is None:
                bad += 1
                log.warning("skipping sample %s (%s); %d skipped by this worker in epoch %d", reader.name(position),
                            why, bad, self.epoch)
                image = self._substitute(reader, plan, index, self.images.decoder)
            yield seeded(self.images.seed, self.epoch, plan.first_position + position,
                         lambda image=image: self.images.transform(image))

    @staticmethod
    def _substitute(reader: _PositionReader, plan: StreamPlan, index: int, decoder: str):
        """The next readable image of the stream's order after ``index`` (else the nearest before it), so that
        batches keep their size and a resume makes the same choice."""
        later = plan.order[index + 1:]
        earlier = plan.order[:index][::-1]
        for position in later:
            image, _ = decode(reader.raw(position, keep=True), decoder)
            if image is not None:
                return image
        for position in earlier:
            image, _ = decode(_PositionReader(reader.urls, plan, skip=set()).raw(position), decoder)
            if image is not None:
                return image
        raise RuntimeError(f"no readable image in the stream of shards {[reader.urls[p.shard] for p in plan.pieces]}")


class _PositionReader:
    """The encoded image of each stream position, read in order through the stream's pieces; positions in
    ``skip`` are passed over without being kept, the others are held until asked for."""

    def __init__(self, urls: list[str], plan: StreamPlan, skip: set[int]):
        self.urls, self.plan, self.skip = urls, plan, skip
        self.held: dict[int, bytes | None] = {}
        self.samples = self._read()

    def _read(self) -> Iterator[tuple[int, bytes | None]]:
        position = 0
        for piece in self.plan.pieces:
            read = 0
            for _, members in iter_samples(self.urls[piece.shard], piece.first, piece.count):
                yield position + read, members.get("image")
                read += 1
            for missing in range(read, piece.count):  # the shard ended early or is damaged
                yield position + missing, None
            position += piece.count

    def raw(self, position: int, keep: bool = False) -> bytes | None:
        while position not in self.held:
            got = next(self.samples, None)
            if got is None:
                return None
            if got[0] not in self.skip:
                self.held[got[0]] = got[1]
        return self.held[position] if keep else self.held.pop(position)

    def name(self, position: int) -> str:
        offset = position
        for piece in self.plan.pieces:
            if offset < piece.count:
                return f"{piece.first + offset} of {self.urls[piece.shard]}"
            offset -= piece.count
        return f"position {position}"
