"""Samplers against closed forms: exact denoisers of Gaussian data, and the grid rules."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffusekit.diffusion.grids import Grid, interpolate_sigma
from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.samplers.common import Denoiser
from diffusekit.samplers.config import SAMPLERS, SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.ddpm import sample_ddpm

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.6, 0.3], [0.3, 0.4]], dtype=torch.float64)


def gaussian_denoiser(config: SamplerConfig):
    """The exact network for data ~ N(MU, COV), in the config's parametrization.

    E[x0 | x_t] = MU + COV a (a^2 COV + s^2 I)^-1 (x_t - a MU)  (Gaussian conditioning).
    """
    schedule = config.schedule()

    def model(x_t, t):
        sigma = interpolate_sigma(schedule, t.double().reshape(1))[0]
        abar = 1 / (1 + sigma**2)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x = x_t.double()
        gain = COV @ torch.linalg.inv(a**2 * COV + s**2 * torch.eye(2, dtype=torch.float64)) * a
        x0 = MU + (x - a * MU) @ gain.T
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[config.prediction_type]
        return out.to(x_t.dtype)

    return model


def sample_gaussian(config: SamplerConfig, steps: int, n: int = 20000, seed: int = 0) -> torch.Tensor:
    grid = build_grid(config, steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * grid.init_noise_sigma
    return run_sampler(config, gaussian_denoiser(config), x, grid, generator=g)


@pytest.mark.parametrize(
    "sampler, steps, prediction",
    [
        ("ddim", 100, "epsilon"),
        ("ddim", 100, "v_prediction"),
        ("ddim", 100, "sample"),
        ("ddpm", 1000, "epsilon"),
        ("ddpm", 250, "v_prediction"),
        ("euler", 100, "epsilon"),
        ("euler_ancestral", 200, "epsilon"),
        ("dpmpp_2m", 30, "epsilon"),
        ("dpmpp_2m", 30, "v_prediction"),
        ("pndm", 50, "epsilon"),
    ],
)
def test_samplers_reproduce_gaussian_data(sampler, steps, prediction):
    # the linear schedule ends at abar_T = 4e-5, so starting from N(0, I) shifts the mean by only ~0.01
    config = SamplerConfig(sampler=sampler, prediction_type=prediction, timestep_spacing="trailing")
    x = sample_gaussian(config, steps, n=10000)
    mean, cov = x.mean(0), torch.cov(x.T)
    # the standard error of the mean is ~0.008 for 10k samples
    assert (mean - MU).abs().max() < 0.04, (mean, MU)
    assert (cov - COV).abs().max() < 0.04, (cov, COV)


def test_deterministic_ddim_maps_noise_to_data_exactly_in_the_limit():
    """DDIM (eta = 0) is the probability-flow ODE: with many steps the mean and covariance become exact."""
    config = SamplerConfig(sampler="ddim", beta_schedule="linear", timestep_spacing="trailing")
    x = sample_gaussian(config, 300, n=40000)
    assert torch.allclose(x.mean(0), MU, atol=0.02)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.02)


def test_a_wrong_sampler_fails_the_gaussian_check():
    """The check above has teeth: DDPM with the wrong variance on a 10-step grid misses the covariance."""
    config = SamplerConfig(sampler="ddpm", variance="fixed_large", timestep_spacing="trailing")
    x = sample_gaussian(config, 10)
    assert (torch.cov(x.T) - COV).abs().max() > 0.04


@pytest.mark.parametrize(
    "sampler, spacing, steps, offset",
    list(itertools.product(SAMPLERS, ("leading", "trailing", "linspace"), (1, 7, 30), (0, 1))),
)
def test_every_option_combines(sampler, spacing, steps, offset):
    config = SamplerConfig(sampler=sampler, num_train_timesteps=100, timestep_spacing=spacing, steps_offset=offset,
                           eta=0.5, clip_sample=1.0)  # fmt: skip
    grid = build_grid(config, steps)
    assert len(grid) == steps
    assert (grid.alphas_cumprod_next >= grid.alphas_cumprod).all()  # every step removes noise
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * grid.init_noise_sigma
    out = run_sampler(config, lambda x_t, t: 0.1 * x_t, x, grid, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_our_ddim_steps_along_the_grid_but_reference_configs_keep_the_stride_rule():
    """On a linspace grid the reference's DDIM lands on t - T // N, not on the next grid entry."""
    ours = SamplerConfig(sampler="ddim", timestep_spacing="linspace")
    ref = scheduler_from_diffusers(
        {"_class_name": "DDIMScheduler", "timestep_spacing": "linspace", "beta_schedule": "linear"}
    )
    g_ours, g_ref = build_grid(ours, 10), build_grid(ref, 10)
    assert g_ours.timesteps.tolist() == g_ref.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    abar = ours.schedule().alphas_cumprod
    # ours: 999 -> 888; reference: 999 -> 999 - 1000 // 10 = 899
    assert float(g_ours.alphas_cumprod_next[0]) == float(abar[888])
    assert abs(float(g_ref.alphas_cumprod_next[0]) - float(abar[899])) < 1e-6
    # on a leading grid both rules agree
    ref_leading = scheduler_from_diffusers({"_class_name": "DDIMScheduler"})
    torch.testing.assert_close(
        build_grid(ref_leading, 10).alphas_cumprod_next.double(),
        build_grid(SamplerConfig(sampler="ddim"), 10).alphas_cumprod_next, rtol=1e-6, atol=0,
    )  # fmt: skip


def test_reference_config_translation_and_errors():
    cfg = scheduler_from_diffusers(
        {"_class_name": "DDPMScheduler", "clip_sample": True, "clip_sample_range": 2.0, "variance_type": "fixed_large",
         "skip_prk_steps": True, "some_future_key": 3}
    )  # fmt: skip
    assert cfg.sampler == "ddpm" and cfg.clip_sample == 2.0 and cfg.variance == "fixed_large"
    assert "some_future_key" in cfg.ignored_keys
    with pytest.raises(ConfigError, match="_class_name='LMSDiscreteScheduler'"):
        scheduler_from_diffusers({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ConfigError, match="thresholding"):
        scheduler_from_diffusers({"_class_name": "DDPMScheduler", "thresholding": True})
    with pytest.raises(ConfigError, match="sampler='lms'"):
        SamplerConfig(sampler="lms")
    with pytest.raises(ConfigError, match="num_inference_steps=2000"):
        build_grid(SamplerConfig(), 2000)
    with pytest.raises(ConfigError, match="eta"):
        SamplerConfig(eta=1.5)
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg


def test_sampler_is_reproducible_from_a_seed_and_per_item_generators():
    config = SamplerConfig(sampler="ddpm", num_train_timesteps=50)
    grid = build_grid(config, 10)
    model = gaussian_denoiser(config)
    x = torch.zeros(3, 2, dtype=torch.float64)
    a = run_sampler(config, model, x, grid, generator=torch.Generator().manual_seed(5))
    b = run_sampler(config, model, x, grid, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # one generator per item: item i equals the same seed run alone
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = run_sampler(config, model, x, grid, generator=gens)
    alone = run_sampler(config, model, x[1:2], grid, generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(batch[1:2], alone)


SD15_DPM = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}  # fmt: skip


def test_reference_dpm_solver_leading_grid_is_its_own_rule():
    """The reference's DPM-Solver spaces a ``leading`` config by T // (N + 1) over N + 1 points, drops the last
    and adds steps_offset -- not DDIM's T // N (SD-1.5, 20 steps: 941, 894, ..., 48)."""
    grid = build_grid(scheduler_from_diffusers({**SD15_DPM, "timestep_spacing": "leading"}), 20)
    assert grid.timesteps.long().tolist() == [47 * k + 1 for k in range(20, 0, -1)]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [5, 20, 25])
def test_dpm_solver_follows_the_reference_scheduler(spacing, steps):
    """Closed loop against the reference's DPMSolverMultistepScheduler (oracle; skipped without the bench extra)
    with a smooth deterministic eps-model: same timesteps, same final sample to float32 rounding."""
    diffusers = pytest.importorskip("diffusers")

    def eps(x, t):
        return torch.tanh(x.double() * 0.7 + torch.as_tensor(t, dtype=torch.float64) / 1000.0) * 0.9

    cfg = {**SD15_DPM, "timestep_spacing": spacing}
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = scheduler_from_diffusers(cfg)
    grid = build_grid(ours, steps)
    assert grid.timesteps.long().tolist() == ref.timesteps.long().tolist()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x0 * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(eps(x, t).float(), t, x).prev_sample
    y = run_sampler(ours, lambda xx, tt, **kw: eps(xx, tt).to(xx.dtype), x0.clone(), grid)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-4)


def test_ddpm_keeps_the_sample_coefficient_when_the_step_spans_almost_all_the_noise():
    """DDPM eq. 7's sqrt(alpha'_t), alpha'_t = abar_t / abar' ~ 2e-9 (cosine schedule, first step of a short
    grid): taken as 1 - beta'_t in float32 it is 0; the coefficient must be computed from the ratio itself."""
    a_t, a_prev = 1e-9, 0.5
    grid = Grid(torch.tensor([999.0]), torch.tensor([a_t]), torch.tensor([a_prev])).to_precision(torch.float32)
    x = torch.ones(3)
    x0_is_zero = Denoiser(lambda x_t, t: torch.zeros_like(x_t), "sample")
    out = sample_ddpm(x0_is_zero, x, grid, inject_noise=[False])
    expected = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t)  # float64
    torch.testing.assert_close(out, torch.full((3,), expected, dtype=torch.float32), rtol=1e-5, atol=0)


def test_one_noise_draw_for_the_whole_library():
    """Pipelines draw their latents with the samplers' function; noise is drawn in float32 then cast (a seed
    gives the same noise in any dtype), one generator per item reproduces that item alone."""
    from diffusekit.pipelines.common import draw
    from diffusekit.samplers.common import draw_noise

    assert draw is draw_noise
    a = draw_noise((2, 3), torch.Generator().manual_seed(7), torch.float64)
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert a.dtype == torch.float64 and torch.equal(a, b.double())
    per_item = draw_noise((3, 4), [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert torch.equal(per_item[1], draw_noise((1, 4), [torch.Generator().manual_seed(2)])[0])
    with pytest.raises(ConfigError, match="got 2 generators for a batch of 3"):
        draw_noise((3, 4), [torch.Generator(), torch.Generator()])
