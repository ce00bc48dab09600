"""The EDM preconditioned denoiser and the EDM Heun sampler (Karras et al. 2022) against the closed form of Gaussian
data N(MU, COV).

For Gaussian data the exact denoiser is D(x; sigma) = MU + COV (COV + sigma^2 I)^-1 (x - MU), so the exact network of
the EDM preconditioning is F = (D - c_skip x) / c_out, written out here from Table 1 (not from our module). Every
deterministic step is affine in the sample, so the sampler's output moments can be propagated exactly by running it
on MU + L e for e in {0, e_1, e_2}, L = (COV + sigma_max^2 I)^(1/2) (the exact marginal at sigma_max): mean = out(0),
covariance = sum_i (out(e_i) - out(0)) (out(e_i) - out(0))^T.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.samplers.common import Denoiser, EDMDenoiser
from diffusekit.samplers.config import EDM_SAMPLERS, SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.heun import Churn, sample_heun

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.6, 0.3], [0.3, 0.4]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


def sqrtm(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag(w.sqrt()) @ v.T


def exact_network(sigma_data: float = 0.5, calls: list | None = None):
    """F(c_in x; c_noise) of the exact Gaussian denoiser, for a preconditioning with ``sigma_data``."""

    def model(x_in, c_noise):
        sigma = math.exp(4 * float(c_noise))  # c_noise = ln(sigma) / 4
        if calls is not None:
            calls.append(sigma)
        x = x_in.double() * math.sqrt(sigma**2 + sigma_data**2)  # c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        d = MU + (x - MU) @ (COV @ torch.linalg.inv(COV + sigma**2 * EYE)).T
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)
        return ((d - c_skip * x) / c_out).to(x_in.dtype)

    return model


def start_state(config: SamplerConfig, grid, e: torch.Tensor) -> torch.Tensor:
    """MU + (COV + sigma_max^2 I)^(1/2) e in the sampler's state (VE for the sigma samplers, else VP)."""
    s0 = float(grid.sigmas[0])
    x = MU + e @ sqrtm(COV + s0**2 * EYE).T
    return x if config.sampler in ("euler", "euler_ancestral", "heun") else x / math.sqrt(1 + s0**2)


def propagated_moments(config: SamplerConfig, steps: int, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    grid = build_grid(config, steps)
    e = torch.cat([torch.zeros(1, 2, dtype=torch.float64), EYE])
    out = run_sampler(config, model or exact_network(config.sigma_data), start_state(config, grid, e), grid)
    cols = out[1:] - out[0]
    return out[0], cols.T @ cols


@pytest.mark.parametrize("sampler, steps, tol", [("heun", 64, 6e-3), ("dpmpp_2m", 64, 6e-3), ("unipc", 64, 6e-3),
                                                 ("ddim", 256, 0.02), ("euler", 256, 0.02)])  # fmt: skip
def test_edm_samplers_reproduce_the_gaussian_mean_and_covariance(sampler, steps, tol):
    """Exact moments after the steps (measured: Heun's covariance error 0.016 / 0.0038 / 0.00092 at 32 / 64 / 128
    steps, second order; DDIM/Euler first order, 0.012 at 256): the tolerances sit above the discretisation error."""
    mean, cov = propagated_moments(SamplerConfig(sampler=sampler, preconditioning="edm"), steps)
    assert (mean - MU).abs().max() < tol, (mean, MU)
    assert (cov - COV).abs().max() < tol, (cov, COV)


def test_edm_heun_follows_the_closed_form_ode_and_is_second_order():
    """x(0) = MU + COV^(1/2) (COV + sigma_max^2 I)^(-1/2) (x(sigma_max) - MU): the probability-flow ODE's solution."""
    errors = []
    for steps in (32, 64):
        cfg = SamplerConfig(sampler="heun", preconditioning="edm")
        grid = build_grid(cfg, steps)
        x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * grid.init_noise_sigma
        exact = MU + (x - MU) @ (sqrtm(COV) @ torch.linalg.inv(sqrtm(COV + 80.0**2 * EYE))).T
        errors.append(float((run_sampler(cfg, exact_network(), x, grid) - exact).abs().max()))
    assert errors[1] < 0.02, errors  # measured 0.033 at 32 steps, 0.15 at 16
    assert errors[0] / errors[1] > 3.0, errors  # halving the step of a second-order method: ~4x


def test_a_wrong_preconditioning_fails_the_gaussian_check():
    """Controls: the same network read with another sigma_data, or as a plain eps-network, misses the moments."""
    cfg = SamplerConfig(sampler="heun", preconditioning="edm", sigma_data=1.0)
    mean, cov = propagated_moments(cfg, 32, model=exact_network(0.5))
    assert max(float((mean - MU).abs().max()), float((cov - COV).abs().max())) > 0.1
    plain = SamplerConfig(sampler="heun", karras_sigmas=True)
    grid = build_grid(plain, 32)
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * grid.init_noise_sigma
    out = run_sampler(plain, lambda x_t, t: exact_network()(x_t, torch.tensor(-1.0)), x, grid)
    assert (out.mean(0) - MU).abs().max() > 0.1 or (torch.cov(out.T) - COV).abs().max() > 0.1


def test_edm_heun_with_churn_reproduces_the_gaussian():
    """Algorithm 2 (S_churn = 10 over 64 steps, S_tmin = 0.05, S_tmax = 50, S_noise = 1): still N(MU, COV), by
    Monte Carlo (20k samples: standard error ~0.006 on the mean and the covariance; measured 0.0013 and 0.014,
    of which ~0.004 is the deterministic sampler's own discretisation error at 64 steps)."""
    cfg = SamplerConfig(sampler="heun", preconditioning="edm", s_churn=10.0, s_tmin=0.05, s_tmax=50.0)
    grid = build_grid(cfg, 64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 2, generator=g, dtype=torch.float64) * grid.init_noise_sigma
    x = run_sampler(cfg, exact_network(), x0, grid, generator=g)
    assert (x.mean(0) - MU).abs().max() < 0.03 and (torch.cov(x.T) - COV).abs().max() < 0.03
    deterministic = run_sampler(cfg.with_sampler("heun", s_churn=0.0), exact_network(), x0, grid)
    assert (x - deterministic).abs().max() > 0.1  # the churn did add noise


def test_churn_raises_only_the_levels_inside_its_range_and_draws_once_per_such_step():
    cfg = SamplerConfig(sampler="heun", preconditioning="edm")
    grid = build_grid(cfg, 10)
    churn = Churn(s_churn=5.0, s_tmin=0.1, s_tmax=10.0)
    calls: list[float] = []
    draws: list[int] = []

    def noise(k, like):
        draws.append(k)
        return torch.zeros_like(like)

    x = torch.zeros(1, 2, dtype=torch.float64)
    sample_heun(EDMDenoiser(exact_network(calls=calls)), x, grid, churn=churn, noise=noise)
    sigmas = [float(s) for s in grid.sigmas]
    inside = [k for k, s in enumerate(sigmas) if 0.1 <= s <= 10.0]
    assert draws == inside
    gamma = min(5.0 / 10, math.sqrt(2) - 1)  # Alg. 2 line 4
    first = [calls[2 * k] for k in range(len(sigmas))]  # each step's first evaluation (2N - 1 calls in all)
    assert len(calls) == 2 * len(sigmas) - 1
    for k, s in enumerate(sigmas):
        assert first[k] == pytest.approx(s * (1 + gamma) if k in inside else s, rel=1e-6)  # c_noise in float32


def test_churn_needs_a_sigma_conditioned_model_and_the_edm_heun_sampler():
    grid = build_grid(SamplerConfig(sampler="heun", karras_sigmas=True), 5)
    with pytest.raises(ConfigError, match="sigma"):
        sample_heun(Denoiser(lambda x, t: x), torch.zeros(1, 2), grid, churn=Churn(s_churn=1.0))
    with pytest.raises(ConfigError, match="s_churn"):
        SamplerConfig(sampler="heun", s_churn=1.0)
    with pytest.raises(ConfigError, match="s_churn"):
        SamplerConfig(sampler="euler", preconditioning="edm", s_churn=1.0)
    with pytest.raises(ConfigError, match="s_tmax"):
        SamplerConfig(sampler="heun", preconditioning="edm", s_churn=1.0, s_tmin=2.0, s_tmax=1.0)
    for sampler in ("ddpm", "pndm", "lcm", "kdpm2"):
        assert sampler not in EDM_SAMPLERS
        with pytest.raises(ConfigError, match="EDM"):
            SamplerConfig(sampler=sampler, preconditioning="edm")


def test_edm_grid_is_the_karras_grid_of_the_config():
    cfg = SamplerConfig(sampler="heun", preconditioning="edm", sigma_min=0.01, sigma_max=20.0)
    grid = build_grid(cfg, 6)
    i = torch.arange(6, dtype=torch.float64)
    lo, hi = 0.01 ** (1 / 7), 20.0 ** (1 / 7)
    expected = (hi + i / 5 * (lo - hi)) ** 7  # eq. 5
    assert torch.allclose(grid.sigmas, expected, rtol=1e-9)
    assert float(grid.sigmas_next[-1]) == 0.0 and grid.init_noise_sigma == pytest.approx(20.0)
    assert torch.allclose(grid.timesteps, expected.log() / 4)
    vp = build_grid(cfg.with_sampler("ddim"), 6)
    assert vp.init_noise_sigma == pytest.approx(20.0 / math.sqrt(1 + 20.0**2))


def test_edm_config_round_trips_through_the_reference_layout():
    cfg = SamplerConfig(sampler="heun", preconditioning="edm", sigma_data=0.6, sigma_max=40.0, s_churn=10.0,
                        s_tmin=0.05, s_tmax=20.0, s_noise=1.003, clip_sample=1.0)  # fmt: skip
    ref = scheduler_to_diffusers(cfg)
    assert ref["_class_name"] == "EDMEulerScheduler" and ref["sigma_data"] == 0.6
    assert scheduler_from_diffusers(ref) == cfg
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg
    # the reference's own EDM scheduler config: its Euler sampler, its preconditioning
    theirs = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
              "sigma_schedule": "karras", "rho": 7.0, "prediction_type": "epsilon", "num_train_timesteps": 1000}
    read = scheduler_from_diffusers(theirs)
    assert (read.sampler, read.preconditioning, read.sigma_max) == ("euler", "edm", 80.0)
    with pytest.raises(ConfigError, match="sigma_schedule"):
        scheduler_from_diffusers({**theirs, "sigma_schedule": "exponential"})
    assert scheduler_to_diffusers(SamplerConfig())["_class_name"] == "DDIMScheduler"  # the classic path is unchanged


def test_with_clipping_edm_ddim_takes_the_euler_steps():
    """Deterministic DDIM is Euler's method in the VE coordinates x = x_t / sqrt(abar) (Karras et al. 2022,
    sec. 4): every intermediate state must agree also when the denoiser's x0 is clamped, i.e. eps_hat must come
    from the clamped x0_hat. A network whose D lies outside [-1, 1] (as guidance makes it) exposes an eps that
    does not."""

    def loud(x_in, c_noise, **_):  # D = c_skip x + c_out (3 x_in + 2): outside [-1, 1] at the high noise levels
        return 3.0 * x_in + 2.0

    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states = {}
    for name in ("ddim", "euler"):
        cfg = SamplerConfig(sampler=name, preconditioning="edm", clip_sample=1.0)
        grid = build_grid(cfg, 12)
        seen: list[torch.Tensor] = []
        run_sampler(cfg, loud, x * grid.init_noise_sigma, grid, callback=lambda info, seen=seen: seen.append(info.x))
        if name == "ddim":  # its state is the VP sample sqrt(abar') x
            seen = [s / grid.alphas_cumprod_next[k] ** 0.5 for k, s in enumerate(seen)]
        states[name] = torch.stack(seen)
    gap = (states["ddim"] - states["euler"]).abs().max()
    assert gap < 1e-6 * states["euler"].abs().max(), gap
