"""Training: optimiser and schedule, loop, checkpoints, evaluation, logging."""
