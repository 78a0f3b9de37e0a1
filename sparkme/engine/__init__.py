"""Training machinery: the pretraining loop, checkpoints, schedules, logging, distributed set-up."""
