"""Training: batches, the tuning-method registry, the process backends (single, DDP, FSDP, DeepSpeed), checkpoints
and resume, evaluation, metrics and progress."""
