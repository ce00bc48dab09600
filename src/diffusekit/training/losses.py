"""The denoising loss: timestep sampling, noising, targets and per-timestep weights.

DDPM (Ho et al. 2020) trains with L_simple = E_{t, x0, eps} || eps - eps_theta(x_t, t) ||^2 (eq. 14), t
uniform, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4). The same regression applies to x0 and v
targets (Salimans & Ho 2022). Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy", eq. 10 and sec. 3.4) reweights timesteps so that low-noise steps, which are easy,
do not dominate the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusekit.diffusion.parametrization import PREDICTION_TYPES, training_target
from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import check_choice


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
