"""DPM-Solver-2 in the sigma form of k-diffusion's ``sample_dpm_2`` (KDPM2).

Lu et al. 2022, "DPM-Solver", Algorithm 1 (DPM-Solver-2, r1 = 1/2) written for the variance-exploding
sample x = x0 + sigma eps and the ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3):
an Euler step to the midpoint sigma_mid = exp((log sigma + log sigma') / 2) (the midpoint in
lambda = -log sigma), then the full step with the slope evaluated there. A step to sigma' = 0 is an Euler
step. N steps cost 2N - 1 network calls; the midpoints' network times come with the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import ConfigError
from diffusekit.samplers.common import Denoiser, StepInfo, time_input
from diffusekit.samplers.euler import denoise_ve


def midpoint_sigma(sigma: float, sigma_next: float) -> float:
    """The geometric mean of two noise levels, the DPM-Solver-2 midpoint (r1 = 1/2 in lambda = -log sigma)."""
    return math.exp((math.log(sigma) + math.log(sigma_next)) / 2) if sigma_next > 0 else 0.0


def sample_kdpm2(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run DPM-Solver-2 steps along ``grid`` (which must carry ``midpoint_timesteps``)."""
    if grid.midpoint_timesteps is None:
        raise ConfigError("KDPM2 needs a grid with midpoint_timesteps (build it with build_grid)")
    for k in range(len(grid)):
        sigma, sigma_next = float(grid.sigmas[k]), float(grid.sigmas_next[k])
        x0 = denoise_ve(denoiser, x, sigma, time_input(grid.timesteps, k), cond)
        d = (x - x0) / sigma  # dx/dsigma at sigma
        if sigma_next > 0:
            sigma_mid = midpoint_sigma(sigma, sigma_next)
            x_mid = x + (sigma_mid - sigma) * d  # Euler step to the midpoint
            x0_mid = denoise_ve(denoiser, x_mid, sigma_mid, time_input(grid.midpoint_timesteps, k), cond)
            x = x + (sigma_next - sigma) * (x_mid - x0_mid) / sigma_mid  # full step, midpoint slope (Alg. 1)
        else:
            x = x + (sigma_next - sigma) * d
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, x0))
    return x
