"""Multistep sampling of a latent consistency model (Luo et al. 2023, "Latent Consistency Models", Alg. 3).

A consistency model f(x_t, t) maps any point of a trajectory to its origin. It is parametrized
(Song et al. 2023, "Consistency Models", eq. 5) as
    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),
with boundary conditions c_skip(0) = 1, c_out(0) = 0 (so f(x, 0) = x). LCM uses sigma_data = 0.5 and the
scaled time s = timestep_scaling * t (LCM eq. 9 with the released models' scaling of 10):
    c_skip = sigma_data^2 / (s^2 + sigma_data^2),  c_out = s / sqrt(s^2 + sigma_data^2).
Each step denoises with f, then re-noises to the next level with fresh noise (LCM Alg. 3, line 6):
    x' = sqrt(abar') f + sqrt(1 - abar') z;  a step to clean data returns f.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.samplers.common import Denoiser, Generator, NoiseSource, StepInfo, noise_source, time_input

SIGMA_DATA = 0.5


def boundary_scalings(t: Tensor, timestep_scaling: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) at network time t (consistency models eq. 5 with LCM's scaled time), in t's dtype."""
    s = t * timestep_scaling
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    timestep_scaling: float = 10.0,
    generator: Generator = None,
    noise: Sequence[Tensor] | NoiseSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run consistency steps along ``grid``; every step that does not land on clean data draws one noise tensor.

    The boundary scalings are computed in the grid's precision (float32 reproduces float32 implementations).
    """
    draw = noise_source(noise, generator)
    for k in range(len(grid)):
        a_t, a_next = grid.alphas_cumprod[k], grid.alphas_cumprod_next[k]  # 0-d, in the grid's precision
        pred = denoiser(x, time_input(grid.timesteps, k), a_t, cond)
        c_skip, c_out = boundary_scalings(grid.timesteps[k].to(a_t.dtype), timestep_scaling)
        denoised = c_out * pred.x0 + c_skip * x  # consistency models eq. 5
        if a_next < 1:
            x = a_next**0.5 * denoised + (1 - a_next) ** 0.5 * draw(k, x)  # LCM Alg. 3, re-noise (DDPM eq. 4)
        else:
            x = denoised
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, denoised))
    return x
