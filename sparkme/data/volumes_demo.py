"""The 3D demo's data, made offline: generated blob volumes plus the NIfTI files that nibabel's wheel ships
(``anatomical.nii``, 33x41x25 at 2 mm; ``example4d.nii.gz``, two 128x96x24 channels).

    python -m sparkme.data.volumes_demo demo_volumes/      # then data=volumes data.root=demo_volumes
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sparkme.data.volumes_synthetic import write_blob_volumes

NIBABEL_FILES = ("anatomical.nii", "example4d.nii.gz")


def nibabel_data_folder() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


def write_demo_volumes(folder: str | Path, generated: int = 8, shape: tuple[int, int, int] = (48, 48, 48),
                       seed: int = 0) -> list[Path]:
    """Fill ``folder`` with ``generated`` blob volumes and nibabel's two files; returns the paths."""
    folder = Path(folder)
    paths = write_blob_volumes(folder, generated, shape, seed)
    for name in NIBABEL_FILES:
        paths.append(Path(shutil.copyfile(nibabel_data_folder() / name, folder / name)))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sparkme.data.volumes_demo FOLDER")
    print("\n".join(str(p) for p in write_demo_volumes(sys.argv[1])))
