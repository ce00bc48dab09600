"""eps_hat re-derived from the clamped x0_hat (``clip_eps``, GLIDE's "clipped model output"): the denoiser's two
outputs describe one point, DDIM then moves along the line through the clamped estimate, and the rule travels
through every saved form of a sampler config (reference folders keep the reference's rule)."""

from __future__ import annotations

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import CLIP_EPS_KEY, scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.samplers.common import Denoiser
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler
from diffusekit.training.config import DiffusionConfig
from diffusekit.training.export import sampler_config

ABAR = torch.tensor(0.3, dtype=torch.float64)
X_T = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).reshape(1, 1, 3, 3)


def loud(x_t, t, **_):
    """An output whose x0_hat lies far outside [-1, 1] for every parametrization (guidance does this)."""
    return torch.full_like(x_t, -6.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_clip_eps_makes_the_two_estimates_one_point(prediction_type):
    alpha, sigma = ABAR**0.5, (1 - ABAR) ** 0.5
    t = torch.tensor(500)
    ref = Denoiser(loud, prediction_type, clip_sample=1.0)(X_T, t, ABAR)
    ours = Denoiser(loud, prediction_type, clip_sample=1.0, clip_eps=True)(X_T, t, ABAR)
    assert torch.equal(ref.x0, ours.x0) and float(ours.x0.abs().max()) <= 1.0
    assert torch.allclose(alpha * ours.x0 + sigma * ours.eps, X_T, atol=1e-12)  # x_t = alpha x0 + sigma eps
    assert not torch.allclose(alpha * ref.x0 + sigma * ref.eps, X_T, atol=1e-3)  # the reference's rule does not
    unclamped = Denoiser(loud, prediction_type, clip_sample=None, clip_eps=True)(X_T, t, ABAR)  # no clamp: no change
    plain = Denoiser(loud, prediction_type)(X_T, t, ABAR)
    assert torch.equal(unclamped.x0, plain.x0) and torch.equal(unclamped.eps, plain.eps)


def test_inside_the_range_both_rules_agree():
    def quiet(x_t, t, **_):
        return 0.1 * x_t

    ref = Denoiser(quiet, clip_sample=10.0)(X_T, torch.tensor(10), ABAR)
    ours = Denoiser(quiet, clip_sample=10.0, clip_eps=True)(X_T, torch.tensor(10), ABAR)
    assert torch.allclose(ref.eps, ours.eps, atol=1e-12) and torch.equal(ref.x0, ours.x0)


def test_ddim_moves_along_the_line_through_the_clamped_estimate():
    """x0_hat is clamped to +1 at every step; with eps from it, deterministic DDIM is Euler's method in
    u = x / sqrt(abar): (u - 1) / sigma stays what it was at the start. With the network's eps it becomes eps."""
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = {}
    for clip_eps in (False, True):
        cfg = SamplerConfig(sampler="ddim", clip_sample=1.0, clip_eps=clip_eps, timestep_spacing="trailing")
        grid = build_grid(cfg, 10)
        seen: list[torch.Tensor] = []

        def record(info, seen=seen, grid=grid):
            abar = grid.alphas_cumprod_next[info.index]
            if abar < 1:
                seen.append((info.x / abar**0.5 - 1) / ((1 - abar) / abar) ** 0.5)

        run_sampler(cfg, loud, x, grid, callback=record)
        ratios[clip_eps] = torch.stack(seen)
    abar0 = grid.alphas_cumprod[0]
    start = (x / abar0**0.5 - 1) / ((1 - abar0) / abar0) ** 0.5
    assert torch.allclose(ratios[True], start.expand_as(ratios[True]), atol=1e-9)
    assert torch.allclose(ratios[False], torch.full_like(ratios[False], -6.0), atol=1e-9)


def test_the_rule_travels_through_saved_configs():
    ours = SamplerConfig(clip_sample=1.0, clip_eps=True)
    written = scheduler_to_diffusers(ours)
    assert written[CLIP_EPS_KEY] is True and CLIP_EPS_KEY.startswith("_")  # the reference skips "_" keys
    assert scheduler_from_diffusers(written).clip_eps
    assert CLIP_EPS_KEY not in scheduler_to_diffusers(SamplerConfig(clip_sample=1.0))
    assert SamplerConfig.from_dict(ours.to_dict()) == ours
    reference = {"_class_name": "DDIMScheduler", "clip_sample": True, "num_train_timesteps": 1000}
    assert not scheduler_from_diffusers(reference).clip_eps  # loaded reference pipelines keep their rule
    assert sampler_config(DiffusionConfig()).clip_eps  # models trained here sample with it
    with pytest.raises(ConfigError, match="clip_eps"):
        SamplerConfig(clip_eps="yes")
    with pytest.raises(ConfigError, match=CLIP_EPS_KEY):
        scheduler_from_diffusers({**written, CLIP_EPS_KEY: "yes"})
