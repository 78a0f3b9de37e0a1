"""Write an image folder as WebDataset tar shards with a manifest.

Sample i is ``<key>.<image suffix>`` (the file's bytes, not re-encoded), ``<key>.path`` (its path under the
folder) and, when every image sits in a class sub-folder, ``<key>.cls`` (the class index; the manifest lists the
sorted class names). The files are shuffled (seeded) before they are cut into shards, so that a shard of a
class-sorted folder such as ImageNet's holds many classes.
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

from sparkme.data.imagefolder import IMAGE_SUFFIXES
from sparkme.data.shards.manifest import MANIFEST_NAME, write_manifest
from sparkme.errors import UsageError


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no times or owners: the same folder, the same bytes
    tar.addfile(info, io.BytesIO(data))


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def write_shards(root: str | Path, out: str | Path, per_shard: int = 1000, prefix: str = "train",
                 seed: int = 0) -> list[Path]:
    """Shards ``out/<prefix>-000000.tar`` ... of the images under ``root`` and ``out/manifest.json``; returns the
    shard paths.

    Raises:
        UsageError: ``root`` is not a folder of images, or ``per_shard`` < 1.
    """
    root, out = Path(root).expanduser(), Path(out).expanduser()
    if isinstance(per_shard, bool) or not isinstance(per_shard, int) or per_shard < 1:
        raise UsageError(f"--per-shard must be an integer >= 1 (samples per shard), got {per_shard!r}")
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder; give a folder of images (flat or one sub-folder per class)")
    files = image_files(root)
    if not files:
        raise UsageError(f"{str(root)!r} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    relative = [file.relative_to(root) for file in files]
    labelled = all(len(path.parts) == 2 for path in relative)
    classes = sorted({path.parts[0] for path in relative}) if labelled else None
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    paths, sizes = [], []
    for number, first in enumerate(range(0, len(order), per_shard)):
        path = out / f"{prefix}-{number:06d}.tar"
        temporary = path.with_name(path.name + ".partial")
        with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in order[first:first + per_shard]:
                key = f"{index:09d}"
                _add(tar, f"{key}{files[index].suffix.lower()}", files[index].read_bytes())
                _add(tar, f"{key}.path", str(relative[index]).encode())
                if classes is not None:
                    _add(tar, f"{key}.cls", str(classes.index(relative[index].parts[0])).encode())
        os.replace(temporary, path)
        paths.append(path)
        sizes.append(len(order[first:first + per_shard]))
    write_manifest(out / MANIFEST_NAME, [str(p) for p in paths], sizes, classes)
    return paths
