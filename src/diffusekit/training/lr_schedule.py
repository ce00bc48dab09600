"""The learning-rate schedule of training: warmup, then constant, cosine or linear decay."""

from __future__ import annotations

import math

from diffusekit.training.config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for optimizer step ``step`` (0-based): linear warmup from 0 over
    ``warmup_steps`` (DDPM app. B), then constant, cosine (Loshchilov & Hutter 2017) or linear decay to
    ``min_lr_ratio`` at ``max_steps``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return 1.0
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.lr_schedule == "cosine" else 1 - progress
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape
