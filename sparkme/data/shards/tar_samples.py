"""Samples of one WebDataset tar: consecutive members sharing a key (``n0001/img7.jpg`` + ``n0001/img7.cls`` are
sample ``n0001/img7``); pretraining reads the sample's image member and nothing else.

Samples before the wanted ones are passed over without reading their bytes (a local file seeks past them; a pipe
reads through), so a worker can start in the middle of a shard.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator

from sparkme.data.shards.sources import open_stream

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "gif", "tif", "tiff"})


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _open_tar(stream, seekable: bool) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r:" if seekable else "r|")


def count_samples(url: str) -> int:
    """Samples in shard ``url`` (reads the tar headers only for a local file)."""
    count, previous = 0, None
    with open_stream(url) as (stream, seekable), _open_tar(stream, seekable) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = split_name(member.name)[0]
            if key != previous:
                count, previous = count + 1, key
    return count


def iter_samples(url: str, skip: int = 0, take: int | None = None,
                 extra: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of samples ``skip .. skip + take - 1`` of shard ``url``, holding the sample's
    first image member and the members whose extension is in ``extra`` (e.g. ``cls``); a sample without an image
    has an empty dict.

    A shard that ends early or is damaged stops the iteration with one warning (the loader substitutes the missing
    samples, see ``sparkme.data.shards.stream``)."""
    index, key, members = -1, None, {}
    end = None if take is None else skip + take
    try:
        with open_stream(url) as (stream, seekable), _open_tar(stream, seekable) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, extension = split_name(member.name)
                if name_key != key:
                    if index >= skip and key is not None:
                        yield key, members
                    index, key, members = index + 1, name_key, {}
                    if end is not None and index >= end:
                        return
                if index < skip:
                    continue
                is_image = extension in IMAGE_EXTENSIONS and "image" not in members
                if is_image or extension in extra:
                    members["image" if is_image else extension] = tar.extractfile(member).read()
            if key is not None and index >= skip and (end is None or index < end):
                yield key, members
    except (tarfile.TarError, OSError, EOFError) as error:
        log.warning("shard %s is damaged after sample %d (%s: %s); its remaining samples are skipped", url,
                    index, type(error).__name__, error)
