"""``sparkme-finetune``: the hydra entry point; all the work is in ``sparkme.finetune.loop.finetune``.

User errors end in one line, ``sparkme-finetune: error: ...``, with exit status 2; a lost rank in one line with exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sparkme.cli import CONFIG_DIR, launch, run_task
from sparkme.hydra_help import CommandHelp

COMMAND = "sparkme-finetune"
HELP = CommandHelp(COMMAND, "fine-tune an encoder plus a classifier on labelled images with SparK's recipe "
                   "(docs/finetuning.md).",
                   (("init=FILE", "the pretrained weights (sparkme checkpoint or export, SparK's files); null: random"),
                    ("data.root=FOLDER", "train/<class>/... and val/<class>/..., or one folder with "
                                         "data.val_fraction=0.1"),
                    ("recipe.epochs=N", "the model's preset is SparK's ImageNet length: 300 epochs for ResNets")),
                   "recipe.base_lr=1e-3,2e-3")
# Its own config folder (conf/finetune/): there ``model=`` is a plain timm name, not pretraining's model group.
FINETUNE_CONFIG_DIR = CONFIG_DIR / "finetune"


@hydra.main(version_base="1.3", config_path=str(FINETUNE_CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from sparkme.finetune.loop import finetune

    run_task(COMMAND, cfg, finetune)


def main() -> None:
    launch(HELP, _hydra_main, FINETUNE_CONFIG_DIR)


if __name__ == "__main__":
    main()
