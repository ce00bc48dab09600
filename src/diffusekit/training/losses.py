"""The denoising loss: timestep sampling, noising, targets and per-timestep weights.

DDPM (Ho et al. 2020) trains with L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2 (eq. 14), t
uniform, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4). The same regression applies to x0 and v
targets (Salimans & Ho 2022). Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", eq. 10 and sec. 3.4) reweights timesteps so that low-noise steps, which are easy,
do not dominate the gradient.

With the EDM preconditioning (Karras et al. 2022, sec. 5 and Table 1) the noise level is sigma with
ln(sigma) ~ N(P_mean, P_std^2), the network sees c_in (y + sigma n) and c_noise, and the loss
lambda(sigma) ||D - y||^2 with lambda = 1 / c_out^2 is the plain MSE of F against its effective target.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffusekit.diffusion.edm import edm_scalings, edm_training_target, log_normal_sigmas
from diffusekit.diffusion.parametrization import PREDICTION_TYPES, training_target
from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import check_choice
from diffusekit.training.config import DiffusionConfig


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma for a network of the given parametrization.

    The paper's weight on the x0-MSE is min(SNR, gamma). Written as MSE on the network's own target it is
    min(SNR, gamma) / SNR for eps (since ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR), min(SNR, gamma)
    for x0, and min(SNR, gamma) / (SNR + 1) for v (since ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2).
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "sample":
        return clipped
    return clipped / (snr + 1)


def offset_noise(noise: Tensor, per_channel: Tensor, strength: float) -> Tensor:
    """eps + strength * n_c with n_c ~ N(0, 1) constant over each image channel (offset noise, Guttenberg
    2023, "Diffusion with Offset Noise"), so that the model learns to change an image's mean brightness.
    ``per_channel`` is (B, C, 1, 1)."""
    return noise + strength * per_channel


def noisy_inputs(
    schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x_t, target) for clean ``x0``, noise ``eps`` and integer timesteps ``t`` (B,): DDPM eq. 4."""
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = alpha * x0 + sigma * noise
    return x_t, training_target(x0, noise, alpha, sigma, prediction_type)


def timestep_weights(schedule: NoiseSchedule, t: Tensor, prediction_type: str, min_snr_gamma: float | None) -> Tensor:
    """Loss weight per sample (B,): ones, or Min-SNR-gamma's weights when ``min_snr_gamma`` is set."""
    if min_snr_gamma is None:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    snr = schedule.snr.to(t.device)[t]
    return min_snr_weight(snr, min_snr_gamma, prediction_type).float()


def weighted_mse(output: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """mean_b weights_b * mean_{c,h,w} (output - target)^2, computed in float32."""
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (weights * per_sample).mean()


class LossInputs(NamedTuple):
    """What one micro-batch's loss needs: the network's input (B, C, H, W) and time (B,), its target and the
    per-sample weights (B,)."""

    x_in: Tensor
    time: Tensor
    target: Tensor
    weights: Tensor


def loss_inputs(
    schedule: NoiseSchedule, diffusion: DiffusionConfig, x0: Tensor, noise: Tensor, t: Tensor, normal: Tensor
) -> LossInputs:
    """The network's input, time, target and weights for clean ``x0`` and noise ``eps``, as ``diffusion`` (a
    ``training.config.DiffusionConfig``) says. Classic: x_t at the integer times ``t`` (DDPM eq. 4), the eps / x0
    / v target, ones or Min-SNR weights. EDM (Karras et al. 2022, Table 1): sigma = exp(P_mean + P_std z) from
    the standard normal draws ``normal``; input c_in (y + sigma n), time c_noise, target (y - c_skip x) / c_out
    and unit weights (lambda(sigma) c_out^2 = 1, eq. 8)."""
    if diffusion.preconditioning != "edm":
        x_t, target = noisy_inputs(schedule, x0, noise, t, diffusion.prediction_type)
        weights = timestep_weights(schedule, t, diffusion.prediction_type, diffusion.min_snr_gamma)
        return LossInputs(x_t, t, target, weights)
    sigma = log_normal_sigmas(normal.to(x0.device), diffusion.p_mean, diffusion.p_std)  # (B,)
    s4 = sigma.reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    s = edm_scalings(s4, diffusion.sigma_data)
    target = edm_training_target(x0, noise, s4, diffusion.sigma_data)
    weights = torch.ones(sigma.shape, dtype=torch.float32, device=x0.device)
    return LossInputs(s.c_in * (x0 + s4 * noise), s.c_noise.reshape(-1), target, weights)
