"""The EDM preconditioning and noise-level distribution (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", sec. 5, Table 1 "Ours" column, eq. 7-8 and appendix B.6).

The network F sees a unit-variance input and predicts a unit-variance target; the denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))        (eq. 7)

for the variance-exploding sample x = y + sigma n (y data with standard deviation sigma_data, n ~ N(0, I)).
The scalings follow from the conditions of appendix B.6: Var[c_in x] = 1, the effective training target
(y - c_skip x) / c_out has unit variance, and c_skip is the value that minimises the c_out this requires
(so the network's errors are amplified as little as possible). Training draws ln(sigma) ~ N(P_mean, P_std^2)
and weights the loss by lambda(sigma) = 1 / c_out^2 (eq. 8 and Table 1), so the loss on F is a plain MSE.
Everything here is tensor math; functions take a sigma tensor (any shape, broadcast against the sample).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PRECONDITIONINGS = ("none", "edm")  # "none": the network is called on the VP sample at its schedule time
SIGMA_DATA = 0.5  # Table 1; the standard deviation of CIFAR-10 pixels in [-1, 1]
P_MEAN, P_STD = -1.2, 1.2  # Table 1, training noise levels ln(sigma) ~ N(P_mean, P_std^2)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # Table 1, the sampling range and the grid exponent of eq. 5


class EDMScalings(NamedTuple):
    """c_skip, c_out, c_in and c_noise at one (or a tensor of) noise level(s)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_scalings(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> EDMScalings:
    """The preconditioning of Table 1 ("Ours"), computed in the dtype of ``sigma``:

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)      minimises c_out (appendix B.6)
    c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)  unit-variance effective target
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)               unit-variance network input
    c_noise = ln(sigma) / 4                                  the network's noise-level input
    """
    total = sigma**2 + sigma_data**2
    return EDMScalings(sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4)


def sigma_of_c_noise(c_noise: Tensor) -> Tensor:
    """The noise level whose c_noise (Table 1: ln(sigma) / 4) the network was given: sigma = exp(4 c_noise)."""
    return (4 * c_noise.double()).exp()


def edm_loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Table 1, eq. 8): the weight
    of ||D(y + sigma n; sigma) - y||^2 that gives the network's own target unit weight at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_training_target(y: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The effective target of F: (y - c_skip (y + sigma n)) / c_out (eq. 8 rewritten with eq. 7, appendix B.6)."""
    s = edm_scalings(sigma, sigma_data)
    return (y - s.c_skip * (y + sigma * noise)) / s.c_out


def log_normal_sigmas(normal: Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> Tensor:
    """Training noise levels sigma = exp(P_mean + P_std z) from standard normal draws z (Table 1, p_train)."""
    return (p_mean + p_std * normal).exp()


def ve_from_vp(x_t: Tensor, alphas_cumprod: Tensor | float) -> tuple[Tensor, Tensor]:
    """(x, sigma) for the VP sample x_t = sqrt(abar) (y + sigma n): x = x_t / sqrt(abar), sigma^2 = (1 - abar) / abar
    (Table 1, the "VP" column's s(t) and sigma(t)). sigma is a float64 tensor shaped like ``alphas_cumprod``."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return x_t / abar.sqrt().to(x_t.device), ((1 - abar) / abar).sqrt()
