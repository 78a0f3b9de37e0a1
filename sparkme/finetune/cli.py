"""``sparkme-finetune``: the hydra entry point; all the work is in ``sparkme.finetune.loop.finetune``.

User errors end in one line, ``sparkme-finetune: error: ...``, with exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from sparkme.cli import CONFIG_DIR, check_group_choices
from sparkme.errors import UsageError, exit_with_usage_error, run_reporting_usage_errors
from sparkme.hydra_output import defer_hydra_output, hold_hydra_output

COMMAND = "sparkme-finetune"
GROUPS = ("logger",)  # the config groups of conf/finetune.yaml; ``model=`` is a plain value here


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    write_after_lock = hold_hydra_output(cfg)  # hydra's records and log go to run_dir once the job holds it
    run_reporting_usage_errors(COMMAND, lambda: _finetune_and_report(cfg, write_after_lock))


def _finetune_and_report(cfg: DictConfig, write_after_lock) -> None:
    from sparkme.finetune.loop import finetune

    summary = finetune(cfg, on_hold=write_after_lock)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


def main() -> None:
    try:
        check_group_choices([arg for arg in sys.argv[1:] if arg.split("=", 1)[0].lstrip("+~") in GROUPS])
    except UsageError as error:
        exit_with_usage_error(COMMAND, error)
    sys.argv[1:] = defer_hydra_output(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
