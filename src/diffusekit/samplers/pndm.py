"""PNDM / PLMS: pseudo linear multistep sampling (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds"), the Stable Diffusion 1.x default, without the Runge-Kutta warm-up.

The transfer function phi (eq. 11) moves x from abar_t to abar' along a noise estimate e; the estimates
are combined by the Adams-Bashforth coefficients of order 1-4 (eq. 12). The first step is a two-call
pseudo improved-Euler step (PLMS with the first step done as in the reference's ``skip_prk_steps``),
so N steps cost N + 1 network calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.samplers.common import Denoiser, StepInfo, time_input

_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def transfer(x: Tensor, eps: Tensor, a_t: Tensor | float, a_prev: Tensor | float) -> Tensor:
    """phi(x, e, t, t') of PNDM eq. (11): the DDIM step from abar_t to abar' written in terms of eps."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - ((a_prev - a_t) / denom) * eps


def sample_pndm(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run PLMS along ``grid`` (N steps, N + 1 network calls when N > 1)."""
    history: list[Tensor] = []
    for k in range(len(grid)):
        a_t, a_prev = grid.alphas_cumprod[k], grid.alphas_cumprod_next[k]  # 0-d, in the grid's precision
        eps = denoiser(x, time_input(grid.timesteps, k), a_t, cond).eps
        history = (history + [eps])[-4:]
        if k == 0 and len(grid) > 1:
            # pseudo improved Euler: predict x at the next level, evaluate there, average the two estimates
            x_pred = transfer(x, eps, a_t, a_prev)
            eps_next = denoiser(x_pred, time_input(grid.timesteps, 1), a_prev, cond).eps
            eps = (eps + eps_next) / 2
        else:
            coeffs = _ADAMS_BASHFORTH[len(history)]
            eps = sum(c * e for c, e in zip(coeffs, reversed(history)))
        x = transfer(x, eps, a_t, a_prev)
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, None))
    return x
