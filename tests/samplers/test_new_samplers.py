"""LCM, Heun, KDPM2 and UniPC against closed forms on Gaussian data (the exact denoiser of N(MU, COV) is known).

For Gaussian data every step of these samplers is linear in the sample, so the distribution of the output is
Gaussian with moments that can be propagated exactly, and the probability-flow ODE has a closed-form
solution: in the variance-exploding form x = x0 + sigma eps, each eigen-direction of COV (eigenvalue l)
scales as sqrt(l + sigma^2), i.e. x(sigma) = MU + (COV + sigma^2 I)^(1/2) (COV + sigma_0^2 I)^(-1/2) (x(sigma_0) - MU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffusekit.diffusion.grids import consistency_timesteps
from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.samplers.config import SIGMA_SAMPLERS, SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.lcm import boundary_scalings

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.6, 0.3], [0.3, 0.4]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


def posterior_gain(abar: float) -> torch.Tensor:
    """G with E[x0 | x_t] = MU + G (x_t - a MU), a = sqrt(abar) (Gaussian conditioning)."""
    a, s2 = abar**0.5, 1 - abar
    return COV @ torch.linalg.inv(abar * COV + s2 * EYE) * a


def exact_model(config: SamplerConfig, log_sigma: bool = False):
    """The network output of the exact denoiser at integer or fractional time t: sigma interpolated linearly in
    t (as Euler-type grids place fractional times), or in log sigma (as ``sigma_to_timestep`` inverts it)."""
    schedule = config.schedule()

    def model(x_t, t):
        t = float(t)
        lo = min(int(t), config.num_train_timesteps - 2)
        w = t - lo
        s_lo, s_hi = schedule.sigmas[lo], schedule.sigmas[lo + 1]
        sigma = s_lo ** (1 - w) * s_hi**w if log_sigma else (1 - w) * s_lo + w * s_hi
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
    cfg = scheduler_from_diffusers({"_class_name": "LCMScheduler", "original_inference_steps": 25,
                                        "timestep_scaling": 5.0})  # fmt: skip
    assert (cfg.sampler, cfg.original_inference_steps, cfg.timestep_scaling) == ("lcm", 25, 5.0)
    assert scheduler_from_diffusers(scheduler_to_diffusers(cfg)) == cfg


# ---------------------------------------------------------------- order of convergence on the exact ODE


def ode_error(sampler: str, steps: int) -> float:
    """Max error, over 64 starting points, of the sample after step N/2 - 1 against the closed-form ODE
    solution from the grid's first level to where that step lands (mid-grid, where the leading grid is smooth
    in lambda). Leading spacing: integer times, where the linear and the log-sigma interpolation agree;
    KDPM2's midpoint times invert log sigma, so its model interpolates so."""
    cfg = SamplerConfig(sampler=sampler, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    grid = build_grid(cfg, steps)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * grid.init_noise_sigma
    out = []
    run_sampler(cfg, exact_model(cfg, log_sigma=sampler == "kdpm2"), x, grid, callback=out.append)
    j = steps // 2 - 1
    ve = sampler in SIGMA_SAMPLERS  # else the VP sample sqrt(abar) (x0 + sigma eps)
    start = x if ve else x / float(grid.alphas_cumprod[0]) ** 0.5
    got = out[j].x if ve else out[j].x / float(grid.alphas_cumprod_next[j]) ** 0.5
    s0, s1 = float(grid.sigmas[0]), float(grid.sigmas_next[j])
    exact = MU + (start - MU) @ (sqrtm(COV + s1**2 * EYE) @ torch.linalg.inv(sqrtm(COV + s0**2 * EYE))).T
    return float((got - exact).abs().max())


@pytest.mark.parametrize(
    "sampler, order",
    [("heun", 2), ("kdpm2", 2), ("unipc", 3), ("euler", 1), ("ddim", 1), ("dpmpp_2m", 2)],
)
def test_error_falls_with_the_order_of_the_method(sampler, order):
    """Halving the step size divides an order-p method's error by ~2^p: Heun (Karras et al. 2022 Alg. 1) and
    DPM-Solver-2 (Lu et al. 2022 Alg. 1) are second order; UniPC-2, a second-order predictor with its
    corrector, third (Zhao et al. 2023); Euler, DDIM (first) and DPM-Solver++(2M) (second) are the controls
    that show the measurement tells orders apart."""
    ratio = ode_error(sampler, 20) / ode_error(sampler, 40)
    assert 2**order * 0.8 < ratio < 2**order * 1.25, ratio


@pytest.mark.parametrize(
    "sampler, prediction", [("heun", "epsilon"), ("kdpm2", "v_prediction"), ("unipc", "epsilon"), ("unipc", "sample")]
)
def test_new_ode_samplers_reproduce_gaussian_data(sampler, prediction):
    cfg = SamplerConfig(sampler=sampler, prediction_type=prediction, timestep_spacing="trailing")
    grid = build_grid(cfg, 25)
    g = torch.Generator().manual_seed(0)
    x = run_sampler(cfg, exact_model(cfg, log_sigma=sampler == "kdpm2"),
                    torch.randn(10000, 2, generator=g, dtype=torch.float64) * grid.init_noise_sigma, grid)  # fmt: skip
    assert (x.mean(0) - MU).abs().max() < 0.04 and (torch.cov(x.T) - COV).abs().max() < 0.04


def test_two_stage_samplers_call_the_network_2n_minus_1_times_at_the_grid_times():
    for sampler in ("heun", "kdpm2"):
        cfg = SamplerConfig(sampler=sampler, timestep_spacing="linspace")
        grid = build_grid(cfg, 5)
        times: list[float] = []

        def model(x, t, times=times):
            times.append(float(t))
            return 0 * x

        run_sampler(cfg, model, torch.ones(1, 2), grid)
        assert len(times) == 9
        assert times[0::2] == grid.timesteps.float().tolist()
        if sampler == "heun":
            assert times[1::2] == grid.timesteps[1:].float().tolist()
        else:
            assert times[1::2] == grid.midpoint_timesteps[:-1].float().tolist()
            assert all(a > m > b for a, m, b in zip(times[0::2], times[1::2], times[2::2]))
    bare = dataclasses.replace(build_grid(SamplerConfig(sampler="kdpm2"), 5), midpoint_timesteps=None)
    with pytest.raises(ConfigError, match="midpoint_timesteps"):
        run_sampler(SamplerConfig(sampler="kdpm2"), lambda x, t: x, torch.ones(2), bare)


def test_heun_refuses_a_grid_that_stops_short_of_its_correction_time():
    cfg = SamplerConfig(sampler="heun")
    with pytest.raises(ConfigError, match="Heun's correction at step 2"):
        run_sampler(cfg, lambda x, t: 0 * x, torch.ones(2), build_grid(cfg, 5)[:3])


def test_unipc_translation_refuses_variants_it_does_not_implement():
    base = {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "disable_corrector": []}
    assert scheduler_from_diffusers(base).sampler == "unipc"
    for key, value in (("solver_type", "bh1"), ("solver_order", 3), ("predict_x0", False), ("lower_order_final", False),
                       ("disable_corrector", [0]), ("final_sigmas_type", "sigma_min")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key}="):
            scheduler_from_diffusers({**base, key: value})
