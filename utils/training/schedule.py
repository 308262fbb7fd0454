"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay to zero at the last step
(Hugging Face's schedules, as alpaca-lora's users know them), as a factor of the peak rate per optimizer step."""

from __future__ import annotations

import math

def lr_lambda(kind: str, warmup: int, total: int):
    """``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``: ``(step + 1) / (warmup + 1)`` while warming
    up (never 0, so the first step learns), then ``kind`` over the remaining ``total - warmup`` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return factor
