"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import check_choice
from diffusekit.samplers.common import Denoiser, Generator, NoiseSource, StepInfo, noise_source, time_input

VARIANCES = ("fixed_small", "fixed_large")


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    variance: str = "fixed_small",
    inject_noise: Sequence[bool] | None = None,
    generator: Generator = None,
    noise: Sequence[Tensor] | NoiseSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run the reverse process p(x_{t'} | x_t) along ``grid``.

    A step from abar_t to abar' (possibly several training steps apart) uses alpha'_t = abar_t / abar' and
    beta'_t = 1 - alpha'_t. Mean (DDPM eq. 7, posterior q(x_t' | x_t, x0) with x0 = x0_hat):
        sqrt(abar') beta'_t / (1 - abar_t) x0 + sqrt(alpha'_t) (1 - abar') / (1 - abar_t) x_t.
    Variance: ``fixed_small`` = beta~ = (1 - abar') / (1 - abar_t) beta'_t, ``fixed_large`` = beta'_t (sec. 3.2).
    ``inject_noise[k]`` says whether step k adds noise (default: every step whose target is not clean data).
    """
    check_choice("variance", variance, VARIANCES)
    draw = noise_source(noise, generator)
    for k in range(len(grid)):
        a_t, a_prev = grid.alphas_cumprod[k], grid.alphas_cumprod_next[k]  # 0-d, in the grid's precision
        pred = denoiser(x, time_input(grid.timesteps, k), a_t, cond)
        alpha = a_t / a_prev  # alpha'_t = 1 - beta'_t, taken directly: 1 - (1 - alpha) loses it when alpha ~ 1e-8
        beta = 1 - alpha
        mean = (a_prev**0.5 * beta / (1 - a_t)) * pred.x0 + (alpha**0.5 * (1 - a_prev) / (1 - a_t)) * x  # DDPM eq. 7
        add = inject_noise[k] if inject_noise is not None else bool(a_prev < 1)
        if add:
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20) if variance == "fixed_small" else beta
            x = mean + var**0.5 * draw(k, x)
        else:
            x = mean
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, pred.x0))
    return x
