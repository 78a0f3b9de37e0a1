"""Fine-tuning with SparK's downstream recipe: ``sparkme.finetune.loop.finetune(cfg)``, ``sparkme-finetune`` on the
command line. The recipe's parts (presets, SparK's layer-wise lr decay, optimizer, schedule, mixup, transforms) each
have a module here; nothing is imported eagerly, so ``import sparkme`` stays light."""
