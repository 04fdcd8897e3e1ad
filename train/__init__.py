"""Training runs: config validation, the trainer, tasks, data, optimizers, checkpoints."""
