"""The EDM preconditioning (Karras et al. 2022, Table 1 and appendix B.6) checked against its defining conditions,
numerically: unit-variance network input, unit-variance effective training target, c_skip the minimiser of c_out,
lambda = 1 / c_out^2; and the log-normal noise-level distribution's moments."""

from __future__ import annotations

import math

import pytest
import torch

from diffusekit.diffusion.edm import (
    edm_loss_weight,
    edm_scalings,
    edm_training_target,
    log_normal_sigmas,
    ve_from_vp,
)

SIGMAS = [0.002, 0.05, 0.3, 0.5, 1.0, 4.0, 80.0]


def data(n: int, sigma_data: float, generator: torch.Generator) -> torch.Tensor:
    """Non-Gaussian data with standard deviation sigma_data and mean 0: a +-sigma_data coin (binary pixels)."""
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1) * sigma_data


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_network_input_and_effective_target_have_unit_variance(sigma, sigma_data):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    y, noise = data(n, sigma_data, g), torch.randn(n, generator=g, dtype=torch.float64)
    s = edm_scalings(torch.tensor(sigma, dtype=torch.float64), sigma_data)
    x_in = s.c_in * (y + sigma * noise)
    target = edm_training_target(y, noise, torch.tensor(sigma, dtype=torch.float64), sigma_data)
    # the standard error of a variance estimate from 400k draws is < 0.3 %
    assert float(x_in.var()) == pytest.approx(1.0, abs=0.01)
    assert float(target.var()) == pytest.approx(1.0, abs=0.01)
    # the target is what makes D exact: c_skip x + c_out target = y
    assert torch.allclose(s.c_skip * (y + sigma * noise) + s.c_out * target, y, atol=1e-9)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_c_skip_minimises_the_c_out_that_a_unit_target_needs(sigma):
    """For any c_skip, a unit-variance target needs c_out^2 = (1 - c_skip)^2 sd^2 + c_skip^2 sigma^2; scan c_skip."""
    sd = 0.5
    c_skip = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    needed = (1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2
    best = int(needed.argmin())
    s = edm_scalings(torch.tensor(sigma, dtype=torch.float64), sd)
    assert float(c_skip[best]) == pytest.approx(float(s.c_skip), abs=1e-5)
    assert float(needed[best]) == pytest.approx(float(s.c_out) ** 2, rel=1e-6)
    assert float(edm_loss_weight(torch.tensor(sigma), sd) * s.c_out.float() ** 2) == pytest.approx(1.0, rel=1e-5)
    assert float(s.c_noise) == pytest.approx(math.log(sigma) / 4)


def test_scalings_broadcast_over_a_batch_of_levels():
    sigma = torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    s = edm_scalings(sigma)
    assert s.c_skip.shape == s.c_out.shape == s.c_in.shape == s.c_noise.shape == (3, 1, 1, 1)
    assert s.c_skip.dtype == torch.float32


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (0.4, 0.6)])
def test_log_normal_sigmas_have_the_configured_moments(p_mean, p_std):
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_sigma = log_normal_sigmas(z, p_mean, p_std).log()
    # standard errors: p_std / sqrt(n) = 0.0027 on the mean, p_std / sqrt(2n) = 0.0019 on the std
    assert float(log_sigma.mean()) == pytest.approx(p_mean, abs=0.012)
    assert float(log_sigma.std()) == pytest.approx(p_std, abs=0.01)
    # and the median of sigma is exp(P_mean)
    assert float(log_normal_sigmas(z, p_mean, p_std).median()) == pytest.approx(math.exp(p_mean), rel=0.02)


def test_ve_from_vp_inverts_the_vp_scaling():
    y, n = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for sigma in (0.01, 1.0, 80.0):
        abar = 1 / (1 + sigma**2)
        x_t = abar**0.5 * y + (1 - abar) ** 0.5 * n  # DDPM eq. 4
        x, s = ve_from_vp(x_t, abar)
        assert float(s) == pytest.approx(sigma, rel=1e-9)
        assert torch.allclose(x, y + sigma * n, atol=1e-9 * max(1.0, sigma))
