"""``sparkme-finetune``: the hydra entry point; all the work is in ``sparkme.finetune.loop.finetune``.

User errors end in one line, ``sparkme-finetune: error: ...``, with exit status 2; a lost rank in one line with exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparkme.cli import CONFIG_DIR, launch, run_task

COMMAND = "sparkme-finetune"
# Its own config folder (conf/finetune/): there ``model=`` is a plain timm name, not pretraining's model group.
FINETUNE_CONFIG_DIR = CONFIG_DIR / "finetune"


@hydra.main(version_base="1.3", config_path=str(FINETUNE_CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from sparkme.finetune.loop import finetune

    run_task(COMMAND, cfg, finetune)


def main() -> None:
    launch(COMMAND, _hydra_main, FINETUNE_CONFIG_DIR)


if __name__ == "__main__":
    main()
