"""Heun's second-order sampler of the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", Algorithm 1, and Algorithm 2 with ``churn``).

The state is the variance-exploding sample x = x0 + sigma eps (as in ``euler``). The ODE is
dx/dsigma = (x - D(x; sigma)) / sigma (eq. 3 with sigma(t) = t). Each step takes an Euler step to sigma',
evaluates the slope there and moves with the average of the two slopes (the trapezoidal rule); a step to
sigma' = 0 stays an Euler step (line 6). N steps cost 2N - 1 network calls.

With churn (Algorithm 2, the stochastic sampler) each step whose level lies in [S_tmin, S_tmax] first raises
the noise level to sigma_hat = (1 + gamma) sigma, gamma = min(S_churn / N, sqrt(2) - 1), by adding fresh
noise of standard deviation S_noise sqrt(sigma_hat^2 - sigma^2), then takes the Heun step from sigma_hat.
sigma_hat is off the grid, so churn needs a denoiser that takes any sigma (the EDM preconditioning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import ConfigError
from diffusekit.limits import check_float
from diffusekit.samplers.common import Denoiser, Generator, NoiseSource, StepInfo, noise_source, time_input
from diffusekit.samplers.euler import denoise_ve


@dataclass(frozen=True)
class Churn:
    """Algorithm 2's S_churn, S_tmin, S_tmax (None: no upper bound) and S_noise; S_churn = 0 is Algorithm 1."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        check_float("s_churn", self.s_churn, 0.0, 1e6)
        check_float("s_tmin", self.s_tmin, 0.0, 1e6)
        if self.s_tmax is not None:
            check_float("s_tmax", self.s_tmax, self.s_tmin, 1e6)
        check_float("s_noise", self.s_noise, 0.0, 10.0)

    def gamma(self, sigma: float, num_steps: int) -> float:
        """gamma_i of Algorithm 2, line 4 (0 outside [S_tmin, S_tmax])."""
        inside = self.s_tmin <= sigma and (self.s_tmax is None or sigma <= self.s_tmax)
        return min(self.s_churn / num_steps, math.sqrt(2) - 1) if inside else 0.0


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    churn: Churn | None = None,
    generator: Generator = None,
    noise: Sequence[Tensor] | NoiseSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run Heun steps along ``grid``. The correction evaluates the network at the next step's time, so each
    step that does not end at sigma = 0 must land where the next step starts. With ``churn`` (S_churn > 0)
    steps in [S_tmin, S_tmax] draw one noise tensor each (from ``noise`` or ``generator``)."""
    n = len(grid)
    draw = noise_source(noise, generator)
    if churn is not None and churn.s_churn > 0 and not denoiser.sigma_conditioned:
        raise ConfigError(
            "s_churn > 0 evaluates the network between the grid's noise levels, which needs a model conditioned "
            "on sigma (preconditioning 'edm'); this model's time input follows its training schedule"
        )
    for k in range(n):
        sigma, sigma_next = float(grid.sigmas[k]), float(grid.sigmas_next[k])
        t = time_input(grid.timesteps, k)  # (a sigma-conditioned denoiser reads sigma instead)
        gamma = churn.gamma(sigma, n) if churn is not None else 0.0
        if gamma > 0:
            sigma_hat = sigma * (1 + gamma)  # Alg. 2 line 5
            x = x + churn.s_noise * (sigma_hat**2 - sigma**2) ** 0.5 * draw(k, x)  # line 6
            sigma = sigma_hat
        x0 = denoise_ve(denoiser, x, sigma, t, cond)
        d = (x - x0) / sigma  # Alg. 1 line 4 (Alg. 2 line 7): dx/dsigma
        x_euler = x + (sigma_next - sigma) * d  # line 5 (Alg. 2 line 8)
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
