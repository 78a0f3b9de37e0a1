"""Start-up checks of a pretraining config: every user error is found here, before a model is built or data read.

Each check raises ``UsageError`` naming the setting, the bad value and what is accepted; ``sparkme-pretrain``
prints it as one line and exits with status 2. Checks that need a model build it on the ``meta`` device (shapes
only, no memory, no time), and checkpoint files are memory-mapped, so start-up stays fast for large models.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sparkme.data.shards.checks import check_shards
from sparkme.data.volumes_checks import check_data_fits_model
from sparkme.engine.distributed import resolve_device
from sparkme.engine.logging import WANDB_MODES
from sparkme.errors import UsageError
from sparkme.masking import check_image_size, check_mask_ratio
from sparkme.sparse.registry import BACKEND_NAMES, get_backend

AMP_CHOICES = (None, "bf16", "fp16")


def _as_usage_error(check, *args):
    """Run a library check that raises ValueError and re-raise it as a user error (same message)."""
    try:
        return check(*args)
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from error


def check_trainer(cfg: DictConfig, counts: tuple[str, ...] = ("batch_size", "accum_steps"),
                  epochs_required: bool = True) -> None:
    """The ``trainer`` settings every loop has: the integer ``counts`` (each >= 1), ``max_steps``, ``epochs`` (when
    ``epochs_required`` and no ``max_steps``), the process-group timeout, AMP and the device."""
    trainer = cfg.trainer
    for key in counts:
        value = trainer[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"trainer.{key} must be an integer >= 1, got {value!r}")
    if trainer.max_steps is not None and (not isinstance(trainer.max_steps, int) or trainer.max_steps < 1):
        raise UsageError(f"trainer.max_steps must be null or an integer >= 1, got {trainer.max_steps!r}")
    if epochs_required and trainer.max_steps is None and (not isinstance(trainer.epochs, int) or trainer.epochs < 1):
        raise UsageError(f"trainer.epochs must be an integer >= 1, got {trainer.epochs!r}")
    timeout = trainer.get("dist_timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise UsageError(f"trainer.dist_timeout_s must be an integer number of seconds >= 1, got {timeout!r}")
    if trainer.amp not in AMP_CHOICES:
        raise UsageError(f"trainer.amp must be null, bf16 or fp16, got {trainer.amp!r}")
    resolve_device(str(trainer.device))


def check_images_and_mask(cfg: DictConfig) -> None:
    size = cfg.image_size
    if not isinstance(size, int) or isinstance(size, bool):
        raise UsageError(f"image_size must be an integer (square images), got {size!r}")
    _as_usage_error(check_image_size, size, size)
    ratio = cfg.mask_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise UsageError(f"mask_ratio must be a number in [0, 1), got {ratio!r}")
    _as_usage_error(check_mask_ratio, ratio)


def usable_backend(name: str) -> str:
    """``name`` when it is a sparse backend whose library imports; else a one-line UsageError (the choices, or how
    to install the missing library)."""
    if name not in BACKEND_NAMES:
        raise UsageError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    try:
        get_backend(name)
    except ImportError as error:
        raise UsageError(str(error).replace("\n", " ")) from error
    return name


def check_backend(cfg: DictConfig) -> None:
    usable_backend(cfg.backend.name)


def check_logger(cfg: DictConfig) -> None:
    mode = cfg.logger.get("wandb_mode")
    if mode is not None and mode not in WANDB_MODES:
        raise UsageError(f"logger.wandb_mode must be offline, online or disabled, got {mode!r}")


def check_data(cfg: DictConfig) -> None:
    """The data folder of ``data=imagefolder`` exists, holds images, and its first image decodes."""
    if cfg.data.get("spatial_dims") == 3:
        return  # volumes: checked with the model's mask block (check_data_fits_model)
    if "root" not in cfg.data.keys():
        return
    if OmegaConf.is_missing(cfg.data, "root"):
        raise UsageError(f"data={cfg.data.name} needs data.root=/path/to/images (a folder of images, flat or "
                         "one sub-folder per class)")
    root = cfg.data.root
    from sparkme.data.imagefolder import IMAGE_SUFFIXES

    folder = Path(str(root)).expanduser()
    if not folder.is_dir():
        raise UsageError(f"data.root {str(folder)!r} does not exist or is not a directory")
    first = next((p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), None)
    if first is None:
        raise UsageError(f"data.root {str(folder)!r} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    from PIL import Image

    try:
        with Image.open(first) as image:
            image.load()
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a broken file
        raise UsageError(f"data.root {str(folder)!r}: the first image {str(first)!r} cannot be read "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "the folder must hold images PIL can decode") from error


def check_eval(cfg: DictConfig) -> None:
    """The kNN monitor's settings: ``eval.every`` a step count, and with it a labelled folder in ``eval.root``."""
    node = cfg.get("eval")
    if node is None:
        return
    every = node.every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UsageError(f"eval.every must be an integer >= 0 (steps between kNN evaluations; 0: off), got {every!r}")
    if every and not node.root:
        raise UsageError("eval.every is set but eval.root is not: give eval.root=/path/to/labelled/images")
    if node.root:
        from sparkme.data.labelled import check_labelled_root

        check_labelled_root(str(node.root), node.val_fraction)


def check_model(cfg: DictConfig) -> torch.nn.Module:
    """Build the configured model on the ``meta`` device: an unknown name or bad setting fails here, in no time."""
    from hydra.utils import instantiate

    node = OmegaConf.to_container(cfg.model, resolve=True)
    node["backend"] = "masked"  # the state-dict layout is the same on every backend; masked needs no library
    try:
        with torch.device("meta"):
            return instantiate(OmegaConf.create(node))
    except Exception as error:  # noqa: BLE001 - hydra wraps the builder's error
        cause: BaseException = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ValueError | TypeError):
            raise UsageError(f"model: {str(cause).splitlines()[0]}") from error
        raise


def check_resume(cfg: DictConfig, model: torch.nn.Module, model_name: str | None = None,
                 kind: str = "pretrain") -> None:
    """``resume=PATH`` (or the run's own latest checkpoint under ``resume=auto``) is a readable sparkme checkpoint
    of this very model, written by the ``kind`` loop (``model_name`` defaults to pretraining's
    ``cfg.model.model_name``)."""
    from sparkme.engine.checkpoint import fit_checkpoint, load_checkpoint
    from sparkme.engine.core import resume_path

    if cfg.resume == "auto" and not cfg.get("run_dir"):
        return
    path = resume_path(cfg.resume, Path(str(cfg.get("run_dir"))))
    if path is None:
        return  # nothing to resume (yet): a fresh start
    path = path.expanduser()
    if not path.is_file():
        raise UsageError(f"resume={cfg.resume!r} is not a file: use resume=auto or the path of an existing "
                         "checkpoint")
    state = _as_usage_error(load_checkpoint, path)
    _as_usage_error(fit_checkpoint, state, model, model_name or cfg.model.model_name, str(path), kind)


def check_init(cfg: DictConfig, model: torch.nn.Module) -> None:
    """``init=PATH`` is readable and its weights (any layout ``load_weights`` knows: sparkme, SparK's whole-model
    or encoder-only files) fit this model: the real loader runs on the ``meta`` model, where copying is a no-op."""
    if not cfg.get("init"):
        return
    from sparkme.models.weights import load_weights

    path = Path(str(cfg.init)).expanduser()
    if not path.is_file():
        raise UsageError(f"init={cfg.init!r} is not a file: give the path of a sparkme or SparK checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that copying into meta parameters does nothing: intended
        _as_usage_error(load_weights, model, path)


def check_optimizer(cfg: DictConfig) -> None:
    compile_update = cfg.optim.optimizer.get("compile")  # FusedLamb's (conf/optim/lamb.yaml)
    if compile_update is not None and not isinstance(compile_update, bool):
        raise UsageError(f"optim.optimizer.compile must be true or false, got {compile_update!r}")


def check_config(cfg: DictConfig, build_model: bool = True) -> None:
    """Raise ``UsageError`` naming the first bad value of ``cfg`` and what is accepted.

    Args:
        cfg: the composed pretraining config.
        build_model: also check the model name and settings and the ``resume=`` file against the model (builds the
            model on the ``meta`` device) and the ``resume=`` / ``init=`` files against the model.
    """
    check_trainer(cfg)
    check_images_and_mask(cfg)
    check_backend(cfg)
    check_logger(cfg)
    check_optimizer(cfg)
    check_data(cfg)
    check_shards(cfg)
    check_eval(cfg)
    if build_model:
        model = check_model(cfg)
        check_data_fits_model(cfg, model)
        check_resume(cfg, model)
        check_init(cfg, model)
