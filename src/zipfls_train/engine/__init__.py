"""Training engine: the loop, distributed set-up, checkpoints, metrics and logging."""
