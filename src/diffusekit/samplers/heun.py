"""Heun's second-order sampler of the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Algorithm 1, deterministic: S_churn = 0).

The state is the variance-exploding sample x = x0 + sigma eps (as in ``euler``). The ODE is
dx/dsigma = (x - D(x; sigma)) / sigma (eq. 3 with sigma(t) = t). Each step takes an Euler step to sigma',
evaluates the slope there and moves with the average of the two slopes (the trapezoidal rule); a step to
sigma' = 0 stays an Euler step (line 6). N steps cost 2N - 1 network calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import ConfigError
from diffusekit.samplers.common import Denoiser, StepInfo, time_input
from diffusekit.samplers.euler import denoise_ve


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run Heun steps along ``grid``. The correction evaluates the network at the next step's time, so each
    step that does not end at sigma = 0 must land where the next step starts."""
    n = len(grid)
    for k in range(n):
        sigma, sigma_next = float(grid.sigmas[k]), float(grid.sigmas_next[k])
        x0 = denoise_ve(denoiser, x, sigma, time_input(grid.timesteps, k), cond)
        d = (x - x0) / sigma  # Alg. 1 line 4: dx/dsigma
        x_euler = x + (sigma_next - sigma) * d  # line 5
        if sigma_next > 0:
            if k + 1 >= n or float(grid.alphas_cumprod[k + 1]) != float(grid.alphas_cumprod_next[k]):
                raise ConfigError(
                    f"Heun's correction at step {k} needs the network time of its target level: the grid must "
                    "continue from where each step lands (build it with build_grid)"
                )
            x0_next = denoise_ve(denoiser, x_euler, sigma_next, time_input(grid.timesteps, k + 1), cond)
            d_next = (x_euler - x0_next) / sigma_next  # line 7
            x = x + (sigma_next - sigma) * (d + d_next) / 2  # line 8: trapezoidal rule
        else:
            x = x_euler
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, x0))
    return x
