"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import check_range
from diffusekit.samplers.common import Denoiser, Generator, NoiseSource, StepInfo, noise_source, time_input


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    eta: float = 0.0,
    generator: Generator = None,
    noise: Sequence[Tensor] | NoiseSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Generalised DDIM steps along ``grid``; eta = 0 is deterministic, eta = 1 matches DDPM's variance.

    sigma_t = eta sqrt((1 - abar') / (1 - abar_t)) sqrt(1 - abar_t / abar')   (DDIM eq. 16)
    x' = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma_t^2) eps_hat + sigma_t z  (DDIM eq. 12)
    With eta > 0 a noise tensor is drawn at every step.
    """
    eta = check_range("eta", eta, 0.0, 1.0)
    draw = noise_source(noise, generator)
    for k in range(len(grid)):
        a_t, a_prev = grid.alphas_cumprod[k], grid.alphas_cumprod_next[k]  # 0-d, in the grid's precision
        pred = denoiser(x, time_input(grid.timesteps, k), a_t, cond)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        direction = (1 - a_prev - sigma**2).clamp(min=0) ** 0.5
        x = a_prev**0.5 * pred.x0 + direction * pred.eps  # DDIM eq. 12
        if eta > 0:
            x = x + sigma * draw(k, x)
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, pred.x0))
    return x
