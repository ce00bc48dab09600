"""Inference grids: which noise levels a sampler visits, and where each step lands.

A ``Grid`` is an explicit list of steps. Step k evaluates the network at time ``timesteps[k]`` on a sample
whose noise level is ``alphas_cumprod[k]`` and moves it to the level ``alphas_cumprod_next[k]``. Samplers
read the next level from the grid and never recompute it from a stride, so any spacing, any step count
and any foreign stepping rule (built once, in ``samplers.config``) run through the same sampler code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import ConfigError, check_choice, check_positive_int

SPACINGS = ("leading", "trailing", "linspace")


def linspace64(start: float, stop: float, num: int, endpoint: bool = True) -> Tensor:
    """``num`` evenly spaced float64 values over [start, stop] (``endpoint=False``: [start, stop)), computed as
    ``numpy.linspace`` computes them.

    numpy forms ``start + i * ((stop - start) / div)``, div = num - 1 (num without the endpoint), and sets
    the last value to ``stop``;
    ``torch.linspace`` fills its second half backwards from ``stop``, so the two can differ in the last bit
    (T = 1000, 27 points: numpy's middle value is 499.49999999999994, torch's 499.50000000000006). Rounded
    to integer timesteps, one bit decides the grid point, so grids are built with numpy's arithmetic.
    """
    div = num - 1 if endpoint else num
    if div == 0:
        return torch.tensor([float(start)], dtype=torch.float64)
    step = (float(stop) - float(start)) / div
    t = torch.arange(num, dtype=torch.float64) * step + float(start)
    if endpoint:
        t[-1] = float(stop)
    return t


def arange64(start: float, stop: float, step: float) -> Tensor:
    """float64 values from ``start`` towards ``stop`` (excluded) by ``step``, as ``numpy.arange`` computes them.

    numpy takes ceil((stop - start) / step) values and fills them as ``start + i * delta`` with
    ``delta = (start + step) - start`` (which can differ from ``step`` in the last bit); the second value is
    ``start + step`` itself.
    """
    start, stop, step = float(start), float(stop), float(step)
    n = max(math.ceil((stop - start) / step), 0)
    delta = (start + step) - start
    t = torch.arange(n, dtype=torch.float64) * delta + start
    if n > 1:
        t[1] = start + step
    return t


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
    (Lin et al. 2024, table 2). ``linspace``: N points evenly spaced over [0, T-1]; rounded to integers
    when ``integer``, else held at float32 precision (the precision of the network's time input).
    ``steps_offset`` is used by ``leading`` only. The points are computed with numpy's float64 arithmetic
    (``linspace64``, ``arange64``) and rounded half to even on the computed value, so a point that lands a
    hair below x.5 rounds down exactly as in implementations built on numpy.
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
        return t.flip(0)
    if spacing == "trailing":
        # numpy's arange with a float step can produce N + 1 values (the last one ~1e-13, i.e. t = -1 after the
        # shift): the N steps asked for are the first N
        return arange64(T, 0, -T / N)[:N].round() - 1
    t = linspace64(0, T - 1, N)
    return (t.round() if integer else t.float().double()).flip(0)


def consistency_timesteps(num_train_timesteps: int, num_steps: int, original_steps: int = 50) -> Tensor:
    """Descending timesteps of a latent consistency model (Luo et al. 2023, sec. 4.2, "skipping-step"):
    the model was distilled on the O = ``original_steps`` times (i + 1) T // O - 1, i < O; sampling with N
    steps takes the entries at floor(linspace(0, O, N, endpoint=False)) of that list in descending order
    (O = 50, N = 4: 999, 759, 499, 259)."""
    T = check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    O = check_positive_int("original_inference_steps", original_steps)
    N = check_positive_int("num_inference_steps", num_steps)
    if O > T:
        raise ConfigError(f"original_inference_steps={O} must be <= num_train_timesteps={T}")
    if N > O:
        raise ConfigError(f"num_inference_steps={N} must be <= original_inference_steps={O} for a consistency model")
    distilled = (torch.arange(1, O + 1, dtype=torch.float64) * (T // O) - 1).flip(0)
    return distilled[linspace64(0, O, N, endpoint=False).floor().long()]


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
    w = ((lo - log_s) / (lo - hi)).clamp(0, 1)
    return (1 - w) * (idx - 1) + w * idx  # = idx - 1 + w, written as the reference rounds it


def _check_descending(t: Tensor, abar: Tensor, abar_next: Tensor) -> None:
    """A grid runs from noise towards data: timesteps never increase, noise levels never increase, and
    no step adds noise. Anything else would sample without error and return meaningless numbers.

    Equal neighbours are allowed (rounded Karras timesteps can repeat; a step from t = 0 to
    abar_0 is a no-op), increasing ones are refused with the first offending position.
    """
    for name, v in (("timesteps", t), ("alphas_cumprod", abar), ("alphas_cumprod_next", abar_next)):
        if not torch.isfinite(v).all():
            k = int((~torch.isfinite(v)).nonzero()[0])
            raise ConfigError(f"grid {name}[{k}] is {float(v[k])}; every entry must be finite")
    for name, v in (("alphas_cumprod", abar), ("alphas_cumprod_next", abar_next)):
        bad = ((v < 0) | (v > 1)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise ConfigError(f"grid {name}[{k}]={float(v[k])} is outside [0, 1]")
    up = (t[1:] > t[:-1]).nonzero()
    if len(up):
        k = int(up[0]) + 1
        raise ConfigError(
            f"grid timesteps must decrease: timesteps[{k}]={float(t[k]):g} > timesteps[{k - 1}]={float(t[k - 1]):g}"
        )
    noisier = (abar[1:] < abar[:-1]).nonzero()
    if len(noisier):
        k = int(noisier[0]) + 1
        raise ConfigError(
            f"grid noise levels must decrease: step {k} starts noisier than step {k - 1} "
            f"(alphas_cumprod[{k}]={float(abar[k]):.6g} < alphas_cumprod[{k - 1}]={float(abar[k - 1]):.6g})"
        )
    adds = (abar_next < abar).nonzero()
    if len(adds):
        k = int(adds[0])
        raise ConfigError(
            f"grid step {k} adds noise: alphas_cumprod_next[{k}]={float(abar_next[k]):.6g} < "
            f"alphas_cumprod[{k}]={float(abar[k]):.6g}"
        )


@dataclass(frozen=True)
class Grid:
    """An explicit sampling grid of N steps (all float64).

    timesteps[k]           the network's time input at step k
    alphas_cumprod[k]      abar of the sample given to step k
    alphas_cumprod_next[k] abar of the sample step k produces (1.0 = clean data)
    init_noise_sigma       scale of the initial unit Gaussian for this grid's sampler state
    midpoint_timesteps[k]  (two-stage solvers, else None) the network time at step k's geometric-mean
                           noise level sqrt(sigma_k sigma_next_k)
    """

    timesteps: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_next: Tensor
    init_noise_sigma: float = 1.0
    midpoint_timesteps: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.timesteps.numel()
        if n == 0 or self.alphas_cumprod.shape != (n,) or self.alphas_cumprod_next.shape != (n,):
            raise ConfigError("a Grid needs timesteps, alphas_cumprod and alphas_cumprod_next of equal length >= 1")
        _check_descending(self.timesteps, self.alphas_cumprod, self.alphas_cumprod_next)
        mid = self.midpoint_timesteps
        if mid is not None and (mid.shape != (n,) or not torch.isfinite(mid).all()):
            raise ConfigError(f"grid midpoint_timesteps must be {n} finite values, got shape {tuple(mid.shape)}")

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
            midpoint_timesteps=None if self.midpoint_timesteps is None else self.midpoint_timesteps[index],
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
