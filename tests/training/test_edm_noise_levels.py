"""The noise levels EDM training actually draws (Karras et al. 2022, Table 1: ln(sigma) ~ N(P_mean, P_std^2)), read
back from what the network is given: the per-micro-batch randomness of the trainer, through the loss inputs, to the
time input c_noise = ln(sigma) / 4 and the input scaling c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.training.config import DiffusionConfig
from diffusekit.training.losses import loss_inputs
from diffusekit.training.randomness import BatchRandomness, micro_batch_generator


def drawn_log_sigmas(diffusion: DiffusionConfig, micro_batches: int, batch: int = 500) -> torch.Tensor:
    """ln(sigma) of every example of ``micro_batches`` global micro-batches, as the trainer draws them."""
    schedule = NoiseSchedule.from_name()
    out = []
    for micro in range(micro_batches):
        rnd = BatchRandomness.draw(micro_batch_generator(0, micro), batch, (1, 2, 2), 1000, 0.0)
        x0 = torch.zeros(batch, 1, 2, 2)
        inputs = loss_inputs(schedule, diffusion, x0, rnd.noise, rnd.t, rnd.normal)
        log_sigma = 4 * inputs.time.double()  # c_noise = ln(sigma) / 4
        # the input is c_in (y + sigma n) with y = 0: its scale tells sigma a second way
        sigma = log_sigma.exp()
        c_in = 1 / (sigma**2 + diffusion.sigma_data**2).sqrt()
        torch.testing.assert_close(inputs.x_in.double(), c_in[:, None, None, None] * sigma[:, None, None, None]
                                   * rnd.noise.double(), rtol=1e-5, atol=1e-6)  # fmt: skip
        out.append(log_sigma)
    return torch.cat(out)


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (0.5, 0.4)])
def test_training_draws_log_normal_noise_levels_with_the_configured_moments(p_mean, p_std):
    """40 micro-batches of 500: n = 20000, standard errors p_std / sqrt(n) = 0.0085 on the mean and
    p_std / sqrt(2n) = 0.006 on the std (at p_std 1.2); the bounds are ~4 standard errors."""
    diffusion = DiffusionConfig(preconditioning="edm", p_mean=p_mean, p_std=p_std)
    log_sigma = drawn_log_sigmas(diffusion, 40)
    n = log_sigma.numel()
    assert abs(float(log_sigma.mean()) - p_mean) < 4 * p_std / math.sqrt(n)
    assert abs(float(log_sigma.std()) - p_std) < 4 * p_std / math.sqrt(2 * n)
    # normal, not just the right two moments: the share within one std is 68.3 % (standard error 0.33 %)
    inside = float(((log_sigma - p_mean).abs() < p_std).double().mean())
    assert abs(inside - 0.6827) < 0.015
    # micro-batches draw different levels (the generator is seeded per micro-batch)
    assert not torch.equal(log_sigma[:500], log_sigma[500:1000])


def test_a_wrong_p_std_is_detected():
    """Control: levels drawn with P_std 1.0 fail the check for 1.2."""
    log_sigma = drawn_log_sigmas(DiffusionConfig(preconditioning="edm", p_std=1.0), 40)
    assert abs(float(log_sigma.std()) - 1.2) > 4 * 1.2 / math.sqrt(2 * log_sigma.numel())
