"""Start-up checks of ``data=volumes``: every volume's header is read (not its data) before anything heavy.

Each check raises ``UsageError`` (one line, exit status 2 in ``sparkme-pretrain``) naming the setting or file, the
bad value and what is accepted: a missing or empty folder, a file that is not a volume, a 2D image, a volume smaller
than one mask block, channel counts that differ or do not match ``data.channels``, and bad settings.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparkme.data.volumes import CHANNEL_MODES, MODALITIES, list_volumes, read_errors, resampled_shape
from sparkme.data.volumes_io import VOLUME_SUFFIXES, VolumeHeader, read_header
from sparkme.errors import UsageError

INSTALL_HINT = "pip install 'sparkme[volumes]' (nibabel)"


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"data.{key} must be an integer >= 1, got {value!r}")
    return value


def _spacing(value) -> tuple[float, float, float] | None:
    if value is None:
        return None
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else None
    if items is None or len(items) != 3 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in items):
        raise UsageError(f"data.spacing must be null or three voxel sizes in mm > 0 such as [1.0, 1.0, 1.0], "
                         f"got {value!r}")
    return tuple(float(v) for v in items)


def check_settings(data: DictConfig, patch_size: int) -> tuple[float, float, float] | None:
    """The settings of ``data`` (crop size a multiple of ``patch_size``, choices, window, spacing); returns the
    target spacing."""
    crop = _positive_int(data.crop_size, "crop_size")
    if crop % patch_size:
        raise UsageError(f"data.crop_size={crop} must be a multiple of the model's mask block of {patch_size} voxels "
                         f"(e.g. {max(patch_size, crop // patch_size * patch_size)})")
    _positive_int(data.channels, "channels")
    if data.channel_mode not in CHANNEL_MODES:
        raise UsageError(f"data.channel_mode must be one of {', '.join(CHANNEL_MODES)}, got {data.channel_mode!r}")
    if data.channel_mode == "split" and data.channels != 1:
        raise UsageError(f"data.channel_mode=split makes one-channel items: data.channels must be 1, "
                         f"got {data.channels!r}")
    if data.modality not in MODALITIES:
        raise UsageError(f"data.modality must be one of {', '.join(MODALITIES)} (mri: z-score per volume; ct: HU "
                         f"window scaled to [0, 1]), got {data.modality!r}")
    window = list(data.ct_window) if OmegaConf.is_list(data.ct_window) else None
    if window is None or len(window) != 2 or not all(isinstance(v, int | float) for v in window) \
            or not window[0] < window[1]:
        raise UsageError(f"data.ct_window must be [low, high] in HU with low < high, got {data.ct_window!r}")
    holdout = data.holdout_volumes
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise UsageError(f"data.holdout_volumes must be an integer >= 0 (volumes kept out of training), "
                         f"got {holdout!r}")
    if data.crops_per_epoch is not None:
        _positive_int(data.crops_per_epoch, "crops_per_epoch")
    return _spacing(data.spacing)


def _header(path: Path) -> VolumeHeader:
    try:
        return read_header(path)
    except read_errors() as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"data.root: {str(path)!r} is not a readable NIfTI volume ({type(error).__name__}: "
                         f"{first[:160]}); the folder must hold .nii or .nii.gz volumes") from error


def check_volume(path: Path, header: VolumeHeader, patch_size: int, spacing) -> None:
    """One volume: three spatial axes, each at least one mask block long at the target spacing."""
    if header.ndim < 3 or min(header.shape) < 2:
        raise UsageError(f"data.root: {str(path)!r} is a 2D image (shape {header.shape}); data=volumes takes 3D "
                         "volumes (a 4D file's fourth axis is its channels)")
    if header.ndim > 5 or (header.ndim == 5 and header.channels == 1 and len(header.shape) != 3):
        raise UsageError(f"data.root: {str(path)!r} has {header.ndim} dimensions; accepted: 3D volumes and 4D "
                         "(channels last)")
    size = resampled_shape(header, spacing)
    if min(size) < patch_size:
        at = f" at data.spacing={list(spacing)}" if spacing is not None else f" (voxels of {header.spacing} mm)"
        raise UsageError(f"data.root: {str(path)!r} is {size[0]}x{size[1]}x{size[2]} voxels{at}, smaller than the "
                         f"model's mask block of {patch_size} voxels along an axis; remove it or set data.spacing "
                         "to finer voxels")


def check_channels(headers: dict[Path, VolumeHeader], data: DictConfig) -> None:
    """With ``channel_mode=stack``: every volume has ``data.channels`` channels."""
    if data.channel_mode == "split":
        return
    counts: dict[int, Path] = {}
    for path, header in headers.items():
        counts.setdefault(header.channels, path)
    if len(counts) > 1:
        (c1, p1), (c2, p2) = list(counts.items())[:2]
        raise UsageError(f"data.root: mixed channel counts: {str(p1)!r} has {c1}, {str(p2)!r} has {c2}; stacked "
                         "channels need the same count in every volume (or data.channel_mode=split: one item per "
                         "channel)")
    (count, path), = counts.items()
    if count != data.channels:
        raise UsageError(f"data.channels={data.channels} but the volumes have {count} channel(s) (e.g. "
                         f"{str(path)!r}); set data.channels={count}, or data.channel_mode=split")


def check_volumes(cfg: DictConfig, patch_size: int) -> None:
    """All of ``data=volumes``: settings, folder, every volume's header, channels, the hold-out count, and no kNN
    monitor (it classifies 2D images)."""
    data = cfg.data
    try:
        import nibabel  # noqa: F401 - only its presence is checked here
    except ImportError as error:
        raise UsageError(f"data=volumes needs nibabel: {INSTALL_HINT}") from error
    if OmegaConf.is_missing(data, "root"):
        raise UsageError("data=volumes needs data.root=/path/to/volumes (a folder of .nii or .nii.gz files)")
    spacing = check_settings(data, patch_size)
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.root {str(root)!r} does not exist or is not a directory")
    files = list_volumes(root)
    if not files:
        others = sum(1 for p in root.rglob("*") if p.is_file())
        raise UsageError(f"data.root {str(root)!r} has no NIfTI volumes ({', '.join(VOLUME_SUFFIXES)}); it holds "
                         f"{others} other file(s)")
    headers = {path: _header(path) for path in files}
    for path, header in headers.items():
        check_volume(path, header, patch_size, spacing)
    check_channels(headers, data)
    if data.holdout_volumes >= len(files):
        raise UsageError(f"data.holdout_volumes={data.holdout_volumes} leaves no volume to train on: data.root "
                         f"holds {len(files)}; use 0 to {len(files) - 1}")
    if cfg.get("eval") is not None and (cfg.eval.get("every") or cfg.eval.get("root")):
        raise UsageError("eval.root / eval.every (the kNN monitor) classify 2D images and are not available with "
                         "data=volumes; leave them unset (the held-out loss is logged)")


def check_data_fits_model(cfg: DictConfig, model) -> None:
    """Volumes go with a 3D model and images with a 2D one; with volumes, ``check_volumes`` at the model's mask
    block (``model``: the configured SparK model, built on the ``meta`` device)."""
    volumes = cfg.data.get("spatial_dims") == 3
    name = cfg.model.model_name
    if volumes and getattr(model, "spatial_dims", 2) != 3:
        from sparkme.models.volumes import VOLUME_MODELS

        raise UsageError(f"data=volumes needs a 3D model ({', '.join(VOLUME_MODELS)}), got model {name!r}")
    if not volumes and getattr(model, "spatial_dims", 2) == 3:
        raise UsageError(f"model {name!r} is a 3D model: give it volumes with data=volumes data.root=/path "
                         f"(got data={cfg.data.name})")
    if volumes:
        check_volumes(cfg, int(model.patch_size))
