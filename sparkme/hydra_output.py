"""Hydra's records (``.hydra/``) and job log, written into the run directory only once the job holds its lock.

By itself hydra writes ``.hydra/{config,hydra,overrides}.yaml`` and opens its job log in its output directory before
the task starts, i.e. before the run lock is taken: a second job refused by the lock would already have overwritten
the first job's records. A hydra CLI (``sparkme-pretrain``, ``sparkme-finetune``) therefore

1. starts hydra with ``hydra.output_subdir=null`` and a job log file opened only at its first line
   (``sparkme.hydra_argv.command_overrides``);
2. at the start of its task calls ``write_after_lock = hold_hydra_output(cfg)`` (the log file is detached until then);
3. passes ``write_after_lock`` to the loop, which calls it on rank 0 once the run directory is held: the records and
   the job log then go to ``cfg.run_dir`` (also when ``run_dir=`` names another directory than hydra's own).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

RECORDS = ".hydra"


def hold_hydra_output(cfg: DictConfig) -> Callable[[], None]:
    """Detach hydra's job log file(s) now; return the function that, once the run directory is held, writes hydra's
    records into ``cfg.run_dir`` and attaches the log file there (lines logged in between go to the console)."""
    root = logging.getLogger()
    files = [handler for handler in root.handlers if isinstance(handler, logging.FileHandler)]
    for handler in files:
        root.removeHandler(handler)
    hydra_cfg = HydraConfig.get()

    def write_after_lock() -> None:
        run_dir = Path(str(cfg.run_dir))
        if hydra_cfg.output_subdir is None:  # null unless the user asked hydra to write its records itself
            records = run_dir / RECORDS
            records.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, records / "config.yaml")
            OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), records / "hydra.yaml")
            OmegaConf.save(hydra_cfg.overrides.task, records / "overrides.yaml")
        for handler in files:
            handler.close()  # opened (if at all) in hydra's directory: the next line opens it in the run directory
            handler.baseFilename = os.path.abspath(run_dir / Path(handler.baseFilename).name)
            root.addHandler(handler)

    return write_after_lock
