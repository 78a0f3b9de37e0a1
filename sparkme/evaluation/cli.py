"""``sparkme-probe``: kNN and linear probe of a frozen encoder on a labelled image folder.

    sparkme-probe model=resnet50 init=runs/spark_resnet50/checkpoints/latest.pt data.root=/data/flowers
    sparkme-probe model=resnet50 init=null data.root=/data/flowers          # the random-init baseline

Arguments are ``key=value`` overrides of ``conf/probe.yaml``, read by hydra as ``sparkme-pretrain`` and
``sparkme-finetune`` read theirs (``--cfg job``, ``--info``, ``--help``, ``-m`` anywhere on the line; the config is
registered in hydra's ConfigStore, so ``model=`` is a setting here, not pretraining's config group). Every setting,
the data folder and the weights file are checked before any image is read (``check_probe_config``); a user error
ends in one line, ``sparkme-probe: error: ...``, with exit status 2. The table goes to the terminal, the figures to
``out`` (JSON); nothing else is written but the feature cache (no hydra folders, no log file).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparkme.cli import CONFIG_DIR, launch
from sparkme.data.labelled import LabelledLayout, check_labelled_root, labelled_splits
from sparkme.engine.distributed import resolve_device
from sparkme.errors import UsageError, run_reporting_usage_errors
from sparkme.evaluation.features import (
    BANK_DTYPES,
    PooledEncoder,
    cache_key,
    cached_features,
    extract_features,
    file_digest,
    probe_transform,
)
from sparkme.evaluation.knn import knn_accuracy
from sparkme.evaluation.linear_probe import OPTIMIZERS, LinearProbeSettings, linear_probe
from sparkme.files import write_atomic
from sparkme.hydra_help import CommandHelp
from sparkme.models.backbones import create_backbone
from sparkme.models.dense_weights import load_pretrained_dense, random_init_report

COMMAND = "sparkme-probe"
CONFIG_FILE = CONFIG_DIR / "probe.yaml"
CONFIG_NAME = "probe"
HELP = CommandHelp(COMMAND, "kNN and linear probe of a frozen encoder on labelled images (docs/evaluation.md).",
                   (("init=FILE", "the weights to evaluate (a sparkme checkpoint or export, SparK's); null: random"),
                    ("data.root=FOLDER", "train/<class>/... and val/<class>/..., or one folder with "
                                         "data.val_fraction=0.2"),
                    ("model=NAME", "the timm (or torchvision, source=torchvision) model the weights are of")),
                   "knn.k=10,20")


def load_config(argv: list[str]) -> DictConfig:
    """``conf/probe.yaml`` with the ``key=value`` overrides of ``argv``; ``UsageError`` for an unknown key."""
    base = OmegaConf.load(CONFIG_FILE)
    for arg in argv:
        if "=" not in arg:
            raise UsageError(f"argument {arg!r} is not key=value; e.g. {COMMAND} model=resnet50 init=PATH "
                             "data.root=FOLDER")
    try:
        overrides = OmegaConf.from_dotlist(list(argv))
        OmegaConf.set_struct(base, True)
        return OmegaConf.merge(base, overrides)
    except OmegaConfBaseException as error:
        raise UsageError(f"bad argument: {str(error).splitlines()[0]}; the settings are those of "
                         f"{CONFIG_FILE.name}") from error


def _positive(cfg: DictConfig, key: str, kind=int) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (kind, int)) or value <= 0:
        raise UsageError(f"{key} must be a {'positive integer' if kind is int else 'positive number'}, got {value!r}")


def check_probe_config(cfg: DictConfig) -> LabelledLayout:
    """Raise ``UsageError`` for the first bad setting; returns the data layout. Builds the model on the ``meta``
    device to check ``init`` against it (no memory, no time)."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise UsageError("data.root is required: a folder with train/<class>/... and val/<class>/..., or one folder "
                         "of <class>/... with data.val_fraction=0.2")
    for key in ("image_size", "batch_size", "knn.k", "knn.chunk", "linear.epochs", "linear.batch_size"):
        _positive(cfg, key)
    if cfg.knn.bank_dtype not in BANK_DTYPES:
        raise UsageError(f"knn.bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {cfg.knn.bank_dtype!r}")
    if cfg.linear.optimizer not in OPTIMIZERS:
        raise UsageError(f"linear.optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.linear.optimizer!r}")
    for key in ("knn.temperature", "linear.blr", "linear.trust_coefficient"):
        _positive(cfg, key, float)
    if cfg.image_size < 32:
        raise UsageError(f"image_size must be an integer >= 32, got {cfg.image_size!r}")
    warmup = cfg.linear.warmup_epochs
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= cfg.linear.epochs:
        raise UsageError(f"linear.warmup_epochs must be an integer in [0, linear.epochs], got {warmup!r}")
    resolve_device(cfg.device, "device", allow_index=True)
    layout = check_labelled_root(cfg.data.root, cfg.data.val_fraction)
    try:
        with torch.device("meta"):
            model = create_backbone(str(cfg.model), str(cfg.source), drop_path_rate=0.0)
    except ValueError as error:
        raise UsageError(f"model={cfg.model}: {str(error).splitlines()[0]}") from error
    if cfg.init is not None:
        if not Path(str(cfg.init)).expanduser().is_file():
            raise UsageError(f"init={cfg.init!r} is not a file: give a pretrained file (sparkme checkpoint or export, "
                             "SparK's released weights, timm / torchvision state dict) or init=null")
        load_pretrained_dense(model, str(cfg.model), Path(str(cfg.init)).expanduser())
    return layout


def build_encoder(cfg: DictConfig) -> tuple[PooledEncoder, str, str]:
    """The pooled dense encoder with ``init``'s weights (or seeded random ones), the weights' identity for the
    cache, and what was loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = create_backbone(str(cfg.model), str(cfg.source), drop_path_rate=0.0)
    if cfg.init is None:
        return PooledEncoder(model), f"random:{cfg.seed}", str(random_init_report(model).layout)
    path = Path(str(cfg.init)).expanduser()
    report = load_pretrained_dense(model, str(cfg.model), path)
    return PooledEncoder(model), file_digest(path), str(report)


def probe(cfg: DictConfig) -> dict:
    """The command's work: check, extract (or read cached) features, kNN, linear probe; returns the results."""
    layout = check_probe_config(cfg)
    device = resolve_device(cfg.device, "device", allow_index=True)
    transform = probe_transform(int(cfg.image_size))
    train_set, val_set, classes = labelled_splits(layout, transform, transform, int(cfg.seed))
    encoder, weights_id, loaded = build_encoder(cfg)
    dtype = BANK_DTYPES[str(cfg.knn.bank_dtype)]
    # float32 features keep the cache key they always had; float16 ones are another file
    model_id = f"{cfg.model}/{cfg.source}" + ("" if dtype == torch.float32 else f"/{cfg.knn.bank_dtype}")
    key = cache_key(weights_id, model_id, transform, train_set.files, val_set.files)
    cache = Path(str(cfg.cache_dir)).expanduser() / f"{cfg.model}-{key}.pt"
    started = time.perf_counter()

    def compute() -> dict:
        train_x, train_y = extract_features(encoder, train_set, int(cfg.batch_size), int(cfg.num_workers), device,
                                            dtype=dtype)
        val_x, val_y = extract_features(encoder, val_set, int(cfg.batch_size), int(cfg.num_workers), device,
                                        dtype=dtype)
        return {"train_features": train_x, "train_labels": train_y, "val_features": val_x, "val_labels": val_y}

    features = cached_features(cache, compute)
    extract_s = time.perf_counter() - started
    results = {"model": str(cfg.model), "init": None if cfg.init is None else str(cfg.init), "weights": loaded,
               "classes": len(classes), "train_images": len(train_set), "val_images": len(val_set),
               "feature_dim": int(features["train_features"].shape[1]), "features_cached": features["cached"],
               "features_file": str(cache), "extract_s": round(extract_s, 2)}
    args = (features["train_features"].to(device), features["train_labels"].to(device),
            features["val_features"].to(device), features["val_labels"].to(device), len(classes))
    if cfg.knn.enabled:
        started = time.perf_counter()
        knn = knn_accuracy(*args, k=int(cfg.knn.k), temperature=float(cfg.knn.temperature),
                           chunk=int(cfg.knn.chunk))
        results.update(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_s=round(time.perf_counter() - started, 2))
    if cfg.linear.enabled:
        started = time.perf_counter()
        settings = LinearProbeSettings(epochs=int(cfg.linear.epochs), warmup_epochs=int(cfg.linear.warmup_epochs),
                                       blr=float(cfg.linear.blr), batch_size=int(cfg.linear.batch_size),
                                       optimizer=str(cfg.linear.optimizer),
                                       trust_coefficient=float(cfg.linear.trust_coefficient))
        linear = linear_probe(*args, settings=settings, seed=int(cfg.seed))
        results.update(linear_top1=linear["top1"], linear_top5=linear["top5"], linear_optimizer=linear["optimizer"],
                       linear_s=round(time.perf_counter() - started, 2))
    return results


def format_table(results: dict) -> str:
    """The results as a small Markdown table (one row per method)."""
    rows = ["| method | top-1 % | top-5 % | seconds |", "|---|---|---|---|",
            f"| features ({results['train_images']} train / {results['val_images']} val, "
            f"{results['feature_dim']}-d{', cached' if results['features_cached'] else ''}) | | | "
            f"{results['extract_s']} |"]
    linear = f"linear probe ({results['linear_optimizer']})" if "linear_optimizer" in results else "linear probe"
    for method, name in (("knn", "kNN"), ("linear", linear)):
        if f"{method}_top1" in results:
            rows.append(f"| {name} | {results[f'{method}_top1']:.2f} | {results[f'{method}_top5']:.2f} | "
                        f"{results[f'{method}_s']} |")
    return "\n".join(rows)


def report(cfg: DictConfig) -> dict:
    """Probe as ``cfg`` says, print the table and write the figures to ``cfg.out``."""
    results = probe(cfg)
    print(f"{cfg.model}, init={cfg.init}: {results['weights']}")
    print(format_table(results))
    try:
        write_atomic(Path(str(cfg.out)).expanduser(), lambda file: json.dump(results, file, indent=2), binary=False)
    except OSError as error:
        raise UsageError(f"cannot write out={cfg.out!r}: {error}; give a path in a writable folder") from error
    print(f"results written to {cfg.out}")
    return results


def run(argv: list[str]) -> dict:
    """The probe from Python: ``argv`` are ``key=value`` overrides of ``conf/probe.yaml``."""
    return report(load_config(argv))


def store_config() -> None:
    """``conf/probe.yaml`` as the primary config ``probe`` of hydra's ConfigStore, with hydra told to write
    nothing: its run folder is the working one, no ``.hydra/`` records, no job log file."""
    node = OmegaConf.load(CONFIG_FILE)
    node.defaults = [{"override hydra/job_logging": "none"}, "_self_"]
    node.hydra = {"run": {"dir": "."}, "output_subdir": None}
    ConfigStore.instance().store(name=CONFIG_NAME, node=node)


@hydra.main(version_base="1.3", config_path=None, config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> None:
    run_reporting_usage_errors(COMMAND, lambda: report(cfg))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sparkme-probe`` (``argv``: the arguments, for a call from Python; default the command
    line's)."""
    store_config()
    saved = sys.argv
    if argv is not None:
        sys.argv = [COMMAND, *argv]
    try:
        launch(HELP, _hydra_main, config_dir=None, config_name=CONFIG_NAME)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
