"""Exponential moving average (EMA) of model weights.

theta_ema <- decay * theta_ema + (1 - decay) * theta after every optimizer step (Polyak & Juditsky 1992;
DDPM, Ho et al. 2020, app. B, samples with an EMA of decay 0.9999). Buffers are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffusekit.errors import ConfigError


def ema_decay(step: int, max_decay: float, warmup: bool = True) -> float:
    """The decay used after optimizer step ``step`` (1-based).

    With ``warmup``: min(max_decay, (1 + step) / (10 + step)), the num_updates rule of TensorFlow's
    ``ExponentialMovingAverage``: the average forgets the random initial weights quickly, then settles.
    """
    if warmup:
        return min(max_decay, (1 + step) / (10 + step))
    return max_decay


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode to hold the average."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema = lerp(theta_ema, theta, 1 - decay) for every parameter; buffers copied."""
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"EMA decay must be in [0, 1], got {decay}")
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ConfigError(f"EMA model has {len(ema_params)} parameters, the model {len(params)}")
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, params)], 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)
