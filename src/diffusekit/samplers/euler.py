"""Euler and Euler-ancestral sampling of the probability-flow ODE / reverse SDE in sigma space.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Algorithm 1 with
no churn; the ancestral variant splits each step into a deterministic move to sigma_down and fresh noise
of size sigma_up (k-diffusion's formulation). The state is the variance-exploding sample
x = x0 + sigma eps = x_t / sqrt(abar); the network sees x / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.samplers.common import Denoiser, Generator, NoiseSource, StepInfo, noise_source, time_input


def denoise_ve(denoiser: Denoiser, x: Tensor, sigma: float, t: Tensor, cond: dict[str, Any] | None) -> Tensor:
    """x0_hat for the variance-exploding sample x = x0 + sigma eps, from a network of the VP sample
    x / sqrt(sigma^2 + 1) at time t (abar = 1 / (sigma^2 + 1), Karras et al. 2022, table 1 "VP" column)."""
    x_in = x / (sigma**2 + 1) ** 0.5  # the VP sample the network was trained on
    return denoiser(x_in, t, 1 / (sigma**2 + 1), cond).x0


def _x0(denoiser: Denoiser, x: Tensor, grid: Grid, k: int, cond: dict[str, Any] | None) -> Tensor:
    return denoise_ve(denoiser, x, float(grid.sigmas[k]), time_input(grid.timesteps, k), cond)


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """x' = x + (x - x0_hat) / sigma (sigma' - sigma)  (Karras et al. 2022, Alg. 1 without the Heun correction)."""
    for k in range(len(grid)):
        sigma, sigma_next = float(grid.sigmas[k]), float(grid.sigmas_next[k])
        x0 = _x0(denoiser, x, grid, k, cond)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, x0))
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    generator: Generator = None,
    noise: Sequence[Tensor] | NoiseSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Euler step to sigma_down, then add sigma_up noise, with sigma_up^2 + sigma_down^2 = sigma'^2 and
    sigma_up = sigma' sqrt(1 - sigma'^2 / sigma^2) (eta = 1). Draws one noise tensor at every step."""
    draw = noise_source(noise, generator)
    for k in range(len(grid)):
        sigma, sigma_next = float(grid.sigmas[k]), float(grid.sigmas_next[k])
        x0 = _x0(denoiser, x, grid, k, cond)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        x = x + sigma_up * draw(k, x)
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, x0))
    return x
