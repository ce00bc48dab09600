"""Conversions between the three network parametrizations: eps (noise), x0 (sample) and v.

With x_t = alpha x_0 + sigma eps, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) (DDPM eq. 4) and
v = alpha eps - sigma x_0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D).
Coefficients broadcast against the sample; they are float tensors or Python floats.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from diffusekit.errors import check_choice

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """x_0 = (x_t - sigma eps) / alpha (DDPM eq. 15)."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha, sigma) -> Tensor:
    """eps = (x_t - alpha x_0) / sigma."""
    return (x_t - alpha * x0) / sigma


def x0_from_v(x_t: Tensor, v: Tensor, alpha, sigma) -> Tensor:
    """x_0 = alpha x_t - sigma v (Salimans & Ho 2022, appendix D)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha, sigma) -> Tensor:
    """eps = alpha v + sigma x_t."""
    return alpha * v + sigma * x_t


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """v = alpha eps - sigma x_0."""
    return alpha * eps - sigma * x0


class Prediction(NamedTuple):
    """A network output read as both a clean-data estimate and a noise estimate."""

    x0: Tensor
    eps: Tensor


def split_output(output: Tensor, x_t: Tensor, alpha, sigma, prediction_type: str) -> Prediction:
    """Turn a raw network output of the given parametrization into (x0_hat, eps_hat)."""
    if prediction_type == "epsilon":
        return Prediction(x0_from_eps(x_t, output, alpha, sigma), output)
    if prediction_type == "sample":
        return Prediction(output, eps_from_x0(x_t, output, alpha, sigma))
    if prediction_type == "v_prediction":
        return Prediction(x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma))
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError  # unreachable


def training_target(x0: Tensor, eps: Tensor, alpha, sigma, prediction_type: str) -> Tensor:
    """What a network of this parametrization is trained to output."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    raise AssertionError  # unreachable
