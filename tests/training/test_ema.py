"""EMA of weights: the update rule, the warmup of the decay, buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.training.ema import ema_decay, ema_update, make_ema


def test_ema_update_is_the_lerp_rule_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = make_ema(model)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, decay=0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
    torch.testing.assert_close(ema[1].running_mean, torch.full((4,), 3.0))
    # decay 0 copies, decay 1 keeps
    ema_update(ema, model, decay=0.0)
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p)
    with pytest.raises(ConfigError):
        ema_update(ema, model, decay=1.5)


def test_ema_decay_warmup():
    assert ema_decay(1, 0.9999) == pytest.approx(2 / 11)
    assert ema_decay(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay(10**7, 0.9999) == 0.9999
    assert ema_decay(1, 0.999, warmup=False) == 0.999
    assert all(ema_decay(n, 0.9999) <= ema_decay(n + 1, 0.9999) for n in range(1, 2000, 37))
