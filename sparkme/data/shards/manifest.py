"""The manifest: how many samples each shard holds, written beside the shards (``manifest.json``).

Every rank runs the same number of steps only if it knows the sizes of all shards before reading them; local
shards without a manifest are counted at start-up (their tar headers only), ``pipe:`` shards need one.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from sparkme.data.shards.sources import is_pipe
from sparkme.data.shards.tar_samples import count_samples
from sparkme.errors import UsageError

MANIFEST_NAME = "manifest.json"


def shard_name(url: str) -> str:
    """The name a manifest lists a shard by: its file name (``pipe:aws s3 cp s3://b/train-000001.tar -`` ->
    ``train-000001.tar``)."""
    words = [word for word in url.split() if word.endswith(".tar") or ".tar" in word]
    return Path(words[-1] if words else url).name


def read_manifest(path: str | Path) -> dict[str, int]:
    """Samples per shard name."""
    try:
        shards = json.loads(Path(path).expanduser().read_text())["shards"]
        return {str(entry["url"]): int(entry["samples"]) for entry in shards}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"data.manifest {str(path)!r} cannot be read as a shard manifest ({error}); write one "
                         "with sparkme-shards write or sparkme-shards count") from error


def default_manifest(urls: list[str]) -> Path | None:
    """``manifest.json`` in the folder of the first local shard, when there is one."""
    local = next((url for url in urls if not is_pipe(url)), None)
    candidate = Path(local).parent / MANIFEST_NAME if local else None
    return candidate if candidate is not None and candidate.is_file() else None


def shard_sizes(urls: list[str], manifest: str | None) -> list[int]:
    """Samples in each shard of ``urls``: from the manifest (given, or found beside the shards), else counted.

    Raises:
        UsageError: a ``pipe:`` shard the manifest does not list, or a local shard that is not a tar file.
    """
    path = Path(manifest) if manifest else default_manifest(urls)
    listed = read_manifest(path) if path is not None else {}
    sizes = []
    for url in urls:
        name = shard_name(url)
        if name in listed:
            sizes.append(listed[name])
        elif is_pipe(url):
            raise UsageError(f"shard {url!r} is not in a manifest: pipe: shards need data.manifest=<manifest.json> "
                             "(sparkme-shards count writes one)")
        else:
            try:
                sizes.append(count_samples(url))
            except tarfile.TarError as error:
                raise UsageError(f"data.urls: shard {url!r} is not a readable tar file ({error})") from error
    return sizes


def write_manifest(path: str | Path, urls: list[str], sizes: list[int], classes: list[str] | None = None) -> None:
    from sparkme.files import write_atomic

    body = {"shards": [{"url": shard_name(url), "samples": size} for url, size in zip(urls, sizes, strict=True)],
            "samples": sum(sizes)}
    if classes is not None:
        body["classes"] = classes
    write_atomic(path, lambda file: file.write(json.dumps(body, indent=1) + "\n"), binary=False)
