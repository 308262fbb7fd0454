"""Training: batches, the tuning-method registry, checkpoints and resume, torchrun set-up, metrics and progress."""
