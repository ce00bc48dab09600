"""Noise schedules: betas -> alphas_cumprod -> sigmas, and the forward process q(x_t | x_0).

All schedule math is float64; tensors are cast to the caller's dtype once, at the edge.
References: DDPM (Ho et al. 2020), improved DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17),
zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, check_choice, check_positive_int

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def make_betas(
    schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Betas of a named schedule as a float64 tensor of shape (T,).

    ``linear``: DDPM sec. 4, betas evenly spaced from beta_start to beta_end.
    ``scaled_linear``: the latent-diffusion schedule, betas = linspace(sqrt(start), sqrt(end))^2.
    ``squaredcos_cap_v2``: improved DDPM eq. 17 with s = 0.008, betas capped at 0.999.
    ``sigmoid``: betas = sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end] (GeoDiff, Xu et al. 2022).
    """
    check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    T = check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
            raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start

    def f(u: float) -> float:  # improved DDPM eq. 17: alpha_bar(t) = f(t) / f(0)
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule over T training timesteps (float64 inside).

    ``alphas_cumprod[t]`` is abar_t of DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. It is the
    primary quantity; betas are derived from it, so a schedule computed elsewhere (e.g. in another
    library's float32 arithmetic, see ``from_betas(..., float32_cumprod=True)``) is represented exactly.
    """

    alphas_cumprod: Tensor  # (T,) float64, strictly decreasing in (0, 1]

    def __post_init__(self) -> None:
        a = self.alphas_cumprod
        if a.ndim != 1 or a.numel() < 2:
            raise ConfigError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a < 0).any() or (a > 1).any():
            raise ConfigError("betas must be finite and in (0, 1]")
        object.__setattr__(self, "alphas_cumprod", a.double())

    @classmethod
    def from_name(
        cls,
        schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """Build a schedule from a named beta schedule (see ``make_betas``)."""
        betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @classmethod
    def from_betas(cls, betas: Sequence[float] | Tensor, float32_cumprod: bool = False) -> NoiseSchedule:
        """Build a schedule from betas: abar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4).

        ``float32_cumprod`` rounds the betas to float32 and takes the product in float32, as the
        reference implementation does; used only when reproducing its trajectories.
        """
        b = torch.as_tensor(betas, dtype=torch.float64)
        if b.ndim != 1 or b.numel() < 2 or not torch.isfinite(b).all() or (b <= 0).any() or (b > 1).any():
            raise ConfigError("betas must be a 1-D sequence of at least 2 finite values in (0, 1]")
        if float32_cumprod:
            return cls(torch.cumprod(1 - b.float(), 0).double())
        return cls(torch.cumprod(1 - b, 0))

    @property
    def betas(self) -> Tensor:
        """beta_t = 1 - abar_t / abar_{t-1}."""
        a = self.alphas_cumprod
        return 1 - a / torch.cat([a.new_ones(1), a[:-1]])

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    @property
    def sigmas(self) -> Tensor:
        """The variance-exploding noise level sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, eq. 5)."""
        abar = self.alphas_cumprod
        return ((1 - abar) / abar).sqrt()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021, VDM eq. 2)."""
        abar = self.alphas_cumprod
        return abar / (1 - abar)

    def check_timesteps(self, t: Tensor, batch: int | None = None) -> Tensor:
        """Validate integer training timesteps: shape () or (B,), values in [0, T-1]."""
        t = torch.as_tensor(t)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ConfigError("t must hold integer training timesteps")
        T = self.num_train_timesteps
        if t.ndim > 1 or (batch is not None and t.ndim == 1 and t.numel() != batch):
            raise ConfigError(f"t must be a scalar or have shape ({batch},), got shape {tuple(t.shape)}")
        if ((t < 0) | (t > T - 1)).any():
            raise ConfigError(f"t must be in [0, {T - 1}] (num_train_timesteps={T}), got {t.tolist()}")
        return t.long()

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) for each batch item, shaped to broadcast against ``like``."""
        t = self.check_timesteps(t, like.shape[0] if like.ndim else None)
        abar = self.alphas_cumprod.to(t.device)[t]
        shape = (-1,) + (1,) * (like.ndim - 1) if t.ndim else ()
        a = abar.sqrt().to(like.dtype).reshape(shape)
        s = (1 - abar).sqrt().to(like.dtype).reshape(shape)
        return a, s

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4), t per batch item."""
        _check_pair(x0, noise, "x0", "noise")
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v-target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
        _check_pair(x0, noise, "x0", "noise")
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not torch.isfinite(a).all():
        raise ConfigError(f"{name_a} contains NaN or infinite values")
    if not torch.isfinite(b).all():
        raise ConfigError(f"{name_b} contains NaN or infinite values")
