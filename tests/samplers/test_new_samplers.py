"""LCM, Heun, KDPM2 and UniPC against closed forms on Gaussian data (the exact denoiser of N(MU, COV) is known).

For Gaussian data every step of these samplers is linear in the sample, so the distribution of the output is
Gaussian with moments that can be propagated exactly, and the probability-flow ODE has a closed-form
solution: in the variance-exploding form x = x0 + sigma eps, each eigen-direction of COV (eigenvalue l)
scales as sqrt(l + sigma^2), i.e. x(sigma) = MU + (COV + sigma^2 I)^(1/2) (COV + sigma_0^2 I)^(-1/2) (x(sigma_0) - MU).
"""

from __future__ import annotations

import pytest
import torch

from diffusekit.diffusion.grids import consistency_timesteps
from diffusekit.errors import ConfigError
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.lcm import boundary_scalings

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.6, 0.3], [0.3, 0.4]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


def posterior_gain(abar: float) -> torch.Tensor:
    """G with E[x0 | x_t] = MU + G (x_t - a MU), a = sqrt(abar) (Gaussian conditioning)."""
    a, s2 = abar**0.5, 1 - abar
    return COV @ torch.linalg.inv(abar * COV + s2 * EYE) * a


def exact_model(config: SamplerConfig):
    """The network output of the exact denoiser at integer or fractional time t (sigma interpolated in t)."""
    from diffusekit.diffusion.grids import interpolate_sigma

    schedule = config.schedule()

    def model(x_t, t):
        sigma = interpolate_sigma(schedule, t.double().reshape(1))[0]
        abar = float(1 / (1 + sigma**2))
        a, s = abar**0.5, (1 - abar) ** 0.5
        x0 = MU + (x_t.double() - a * MU) @ posterior_gain(abar).T
        eps = (x_t.double() - a * x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[config.prediction_type].to(x_t.dtype)

    return model


def sqrtm(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag(w.sqrt()) @ v.T


# ---------------------------------------------------------------- LCM


def lcm_moments(config: SamplerConfig, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of LCM's output, propagated exactly: x ~ N(m, C) -> denoised = A x + b ->
    x' = sqrt(abar') denoised + sqrt(1 - abar') z (consistency models eq. 5, LCM Alg. 3)."""
    abar_all = config.schedule().alphas_cumprod
    t = consistency_timesteps(config.num_train_timesteps, steps, config.original_inference_steps)
    m, C = torch.zeros(2, dtype=torch.float64), EYE.clone()
    for k in range(steps):
        abar = float(abar_all[int(t[k])])
        G = posterior_gain(abar)
        c_skip, c_out = (float(c) for c in boundary_scalings(t[k], config.timestep_scaling))
        A = c_out * G + c_skip * EYE
        b = c_out * (MU - G @ (abar**0.5 * MU))
        m, C = A @ m + b, A @ C @ A.T
        if k < steps - 1:
            a_next = float(abar_all[int(t[k + 1])])
            m, C = a_next**0.5 * m, a_next * C + (1 - a_next) * EYE
    return m, C


@pytest.mark.parametrize("steps, prediction", [(4, "epsilon"), (8, "v_prediction"), (1, "epsilon")])
def test_lcm_output_has_the_propagated_moments(steps, prediction):
    config = SamplerConfig(sampler="lcm", prediction_type=prediction)
    grid = build_grid(config, steps)
    g = torch.Generator().manual_seed(0)
    x = run_sampler(config, exact_model(config), torch.randn(40000, 2, generator=g, dtype=torch.float64), grid,
                    generator=g)  # fmt: skip
    m, C = lcm_moments(config, steps)
    assert (x.mean(0) - m).abs().max() < 0.02, (x.mean(0), m)
    assert (torch.cov(x.T) - C).abs().max() < 0.02, (torch.cov(x.T), C)
    # the check has teeth: the consistency output shrinks the covariance well below the data's
    assert (C - COV).abs().max() > 0.1


def test_lcm_boundary_conditions_and_grid():
    c_skip, c_out = boundary_scalings(torch.tensor(0.0, dtype=torch.float64), 10.0)
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)  # f(x, 0) = x
    c_skip, c_out = boundary_scalings(torch.tensor(999.0, dtype=torch.float64), 10.0)
    assert float(c_skip) < 1e-8 and abs(float(c_out) - 1) < 1e-8
    assert consistency_timesteps(1000, 4, 50).tolist() == [999, 759, 499, 259]
    grid = build_grid(SamplerConfig(sampler="lcm", timestep_spacing="trailing", steps_offset=1), 4)
    assert grid.timesteps.tolist() == [999, 759, 499, 259] and float(grid.alphas_cumprod_next[-1]) == 1.0
    with pytest.raises(ConfigError, match="num_inference_steps=51 must be <= original_inference_steps=50"):
        build_grid(SamplerConfig(sampler="lcm"), 51)
    cfg = SamplerConfig.from_reference({"_class_name": "LCMScheduler", "original_inference_steps": 25,
                                        "timestep_scaling": 5.0})  # fmt: skip
    assert (cfg.sampler, cfg.original_inference_steps, cfg.timestep_scaling) == ("lcm", 25, 5.0)
    assert SamplerConfig.from_reference(cfg.to_reference()) == cfg
