"""Where shards come from: ``data.urls`` expanded into one address per shard, and each address opened as a stream.

An address is a local path or ``pipe:<command>`` whose standard output is the tar (how object stores are read:
``pipe:aws s3 cp s3://bucket/train-000000.tar -``, ``pipe:gsutil cat gs://...``, ``pipe:curl -sL https://...``).
Brace patterns (``train-{000000..001281}.tar``) are expanded as webdataset expands them; a local path may also be a
glob (``train-*.tar``).
"""

from __future__ import annotations

import glob
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sparkme.errors import UsageError

PIPE = "pipe:"


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def _brace_expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # installed with webdataset (the `shards` extra)
    except ImportError as error:
        raise UsageError("data=shards needs webdataset: pip install 'sparkme[shards]'") from error
    return list(braceexpand(pattern))


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """One address per shard, in the given order: ``urls`` is one pattern, several separated by spaces or ``::``
    (webdataset's separator), or a list of them.

    Raises:
        UsageError: a pattern that matches nothing, or a local shard that does not exist.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    addresses: list[str] = []
    for pattern in patterns:
        for part in str(pattern).replace("::", " ").split() if not is_pipe(str(pattern)) else [str(pattern)]:
            for url in _brace_expand(part):
                if is_pipe(url):
                    addresses.append(url)
                    continue
                path = str(Path(url).expanduser())
                if any(char in path for char in "*?["):
                    matches = sorted(glob.glob(path))
                    if not matches:
                        raise UsageError(f"data.urls pattern {url!r} matches no file; give existing .tar shards, a "
                                         "brace pattern (train-{000000..000099}.tar) or pipe:<command>")
                    addresses.extend(matches)
                    continue
                if not Path(path).is_file():
                    raise UsageError(f"data.urls: shard {path!r} does not exist; give existing .tar shards, a "
                                     "brace pattern (train-{000000..000099}.tar) or pipe:<command>")
                addresses.append(path)
    if not addresses:
        raise UsageError(f"data.urls {urls!r} names no shard; give .tar paths, a brace pattern or pipe:<command>")
    return addresses


@contextmanager
def open_stream(url: str) -> Iterator[tuple[IO[bytes], bool]]:
    """The bytes of shard ``url`` and whether the stream can seek (local files can: skipped members are not read).

    A pipe's command is ended when the stream is closed early (a worker that read the part of the shard it needs)."""
    if not is_pipe(url):
        with open(url, "rb") as stream:
            yield stream, True
        return
    process = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
    try:
        yield process.stdout, False
    finally:
        process.stdout.close()
        if process.poll() is None:
            process.terminate()
        process.wait()
