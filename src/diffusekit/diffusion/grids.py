"""Inference grids: which noise levels a sampler visits, and where each step lands.

A ``Grid`` is an explicit list of steps. Step k evaluates the network at time ``timesteps[k]`` on a sample
whose noise level is ``alphas_cumprod[k]`` and moves it to the level ``alphas_cumprod_next[k]``. Samplers
read the next level from the grid and never recompute it from a stride, so any spacing, any step count
and any foreign stepping rule (built once, in ``samplers.config``) run through the same sampler code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import ConfigError, check_choice, check_positive_int

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    integer: bool = True,
) -> Tensor:
    """Descending inference timesteps (float64) for N = ``num_steps`` out of T training steps.

    ``leading``: (N-1)r, ..., r, 0 plus ``steps_offset`` with r = T // N (DDIM, Song et al. 2021).
    ``trailing``: round(T, T - T/N, ..., T/N) - 1, which starts at the last training step
    (Lin et al. 2024, table 2). ``linspace``: N points evenly spaced over [0, T-1], rounded to integers
    when ``integer`` (round half to even). ``steps_offset`` is used by ``leading`` only.
    """
    check_choice("timestep_spacing", spacing, SPACINGS)
    T = check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    N = check_positive_int("num_inference_steps", num_steps)
    if N > T:
        raise ConfigError(f"num_inference_steps={N} must be <= num_train_timesteps={T}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ConfigError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if spacing == "leading":
        t = torch.arange(N, dtype=torch.float64) * (T // N) + steps_offset
        if t[-1] > T - 1:
            raise ConfigError(f"steps_offset={steps_offset} pushes the first timestep past T-1={T - 1}")
    elif spacing == "trailing":
        # T - k T/N for k < N, computed directly (an arange with a float step can overshoot by one entry)
        t = (T - torch.arange(N, dtype=torch.float64) * (T / N)).round().flip(0) - 1
    else:
        t = torch.linspace(0, T - 1, N, dtype=torch.float64)
        if integer:
            t = t.round()
    return t.flip(0)


def interpolate_sigma(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """sigma(t) for fractional t, linearly interpolated between training steps (float64)."""
    sigmas = schedule.sigmas
    t = t.double().clamp(0, schedule.num_train_timesteps - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=schedule.num_train_timesteps - 1)
    w = t - lo
    return (1 - w) * sigmas[lo] + w * sigmas[hi]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Noise levels of Karras et al. 2022 ("Elucidating the Design Space"), eq. 5: descending, float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(schedule: NoiseSchedule, sigma: Tensor) -> Tensor:
    """Invert ``interpolate_sigma``: the fractional training time whose sigma is ``sigma``.

    Interpolates linearly in log-sigma between neighbouring training steps (Karras et al. 2022, sec. C.3.4).
    """
    log_sigmas = schedule.sigmas.log()
    log_s = sigma.double().log()
    idx = torch.searchsorted(log_sigmas, log_s).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_s - lo) / (hi - lo)).clamp(0, 1)
    return idx - 1 + w


@dataclass(frozen=True)
class Grid:
    """An explicit sampling grid of N steps (all float64).

    timesteps[k]           the network's time input at step k
    alphas_cumprod[k]      abar of the sample given to step k
    alphas_cumprod_next[k] abar of the sample step k produces (1.0 = clean data)
    init_noise_sigma       scale of the initial unit Gaussian for this grid's sampler state
    """

    timesteps: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_next: Tensor
    init_noise_sigma: float = 1.0

    def __post_init__(self) -> None:
        n = self.timesteps.numel()
        if n == 0 or self.alphas_cumprod.shape != (n,) or self.alphas_cumprod_next.shape != (n,):
            raise ConfigError("a Grid needs timesteps, alphas_cumprod and alphas_cumprod_next of equal length >= 1")

    def __len__(self) -> int:
        return self.timesteps.numel()

    @property
    def sigmas(self) -> Tensor:
        """VE noise level sqrt((1 - abar) / abar) of each step's input."""
        a = self.alphas_cumprod
        return ((1 - a) / a).sqrt()

    @property
    def sigmas_next(self) -> Tensor:
        a = self.alphas_cumprod_next
        return ((1 - a) / a).sqrt()

    def to_precision(self, dtype: torch.dtype) -> Grid:
        """The same grid with its noise levels held in ``dtype``; samplers do their coefficient
        arithmetic in the grid's precision (float32 reproduces float32 implementations exactly)."""
        return replace(
            self,
            alphas_cumprod=self.alphas_cumprod.to(dtype),
            alphas_cumprod_next=self.alphas_cumprod_next.to(dtype),
        )

    def __getitem__(self, index: slice) -> Grid:
        """A contiguous run of steps, e.g. ``grid[-n:]`` (image-to-image starts part way down)."""
        if not isinstance(index, slice):
            raise TypeError("a Grid is sliced with a slice, e.g. grid[k:k+1]")
        return replace(
            self,
            timesteps=self.timesteps[index],
            alphas_cumprod=self.alphas_cumprod[index],
            alphas_cumprod_next=self.alphas_cumprod_next[index],
        )

    @classmethod
    def on_schedule(
        cls, schedule: NoiseSchedule, timesteps: Tensor, final_alpha_cumprod: float = 1.0
    ) -> Grid:
        """Integer timesteps; each step lands on the next grid entry, the last on ``final_alpha_cumprod``."""
        t = timesteps.double()
        abar = schedule.alphas_cumprod[t.long()]
        nxt = torch.cat([abar[1:], torch.tensor([final_alpha_cumprod], dtype=torch.float64)])
        return cls(t, abar, nxt)

    @classmethod
    def from_sigmas(cls, timesteps: Tensor, sigmas: Tensor, init_noise_sigma: float | None = None) -> Grid:
        """A grid given by N+1 VE noise levels (the last usually 0) and N network times."""
        sigmas = sigmas.double()
        abar = 1 / (1 + sigmas**2)  # sigma^2 = (1 - abar) / abar
        if init_noise_sigma is None:
            init_noise_sigma = float((sigmas[0] ** 2 + 1).sqrt())
        return cls(timesteps.double(), abar[:-1], abar[1:], init_noise_sigma)
