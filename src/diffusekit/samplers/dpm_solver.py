"""DPM-Solver++(2M), the multistep second-order solver of the data-prediction ODE.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
Algorithm 2. With alpha = sqrt(abar), s = sqrt(1 - abar), lambda = log(alpha / s) and h = lambda' - lambda:
    x' = (s' / s) x - alpha' (e^{-h} - 1) (m + D / 2),   D = (m - m_prev) / r,  r = (lambda - lambda_prev) / h.
The first step and the last step are first order (D = 0); a step to clean data returns m.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.samplers.common import Denoiser, StepInfo, time_input


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run DPM-Solver++(2M) along ``grid`` on the variance-preserving sample x_t."""
    m_prev: Tensor | None = None
    lam_prev = 0.0
    n = len(grid)
    for k in range(n):
        a_t, a_next = float(grid.alphas_cumprod[k]), float(grid.alphas_cumprod_next[k])
        m = denoiser(x, time_input(grid.timesteps, k), a_t, cond).x0
        alpha, s = a_t**0.5, (1 - a_t) ** 0.5
        lam = math.log(alpha) - math.log(s)
        if a_next >= 1.0:
            x = m  # lambda' = inf: the exact solution at sigma = 0 is the data prediction
        else:
            alpha_n, s_n = a_next**0.5, (1 - a_next) ** 0.5
            h = math.log(alpha_n) - math.log(s_n) - lam
            phi = math.expm1(-h)  # e^{-h} - 1
            if m_prev is None or k == n - 1:
                x = (s_n / s) * x - (alpha_n * phi) * m  # DPM-Solver++ eq. (9), first order
            else:
                r = (lam - lam_prev) / h
                d = (m - m_prev) / r
                x = (s_n / s) * x - (alpha_n * phi) * m - (0.5 * alpha_n * phi) * d
        m_prev, lam_prev = m, lam
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, m))
    return x
