"""Noise schedules, the forward process and parametrization conversions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusekit.diffusion import parametrization as P
from diffusekit.diffusion.grids import spaced_timesteps
from diffusekit.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule, make_betas, rescale_zero_terminal_snr
from diffusekit.errors import ConfigError


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_schedules_are_valid_and_decreasing(name):
    s = NoiseSchedule.from_name(name, 1000)
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float64
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] < abar[0] < 1
    # betas are recovered from alphas_cumprod
    torch.testing.assert_close(s.betas, make_betas(name, 1000), rtol=1e-9, atol=1e-12)


def test_cosine_schedule_matches_closed_form():
    s = NoiseSchedule.from_name("squaredcos_cap_v2", 1000)
    f = [math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for u in (0, 500, 1000)]
    # improved DDPM eq. 17: abar_t = f(t) / f(0), where no beta hit the 0.999 cap
    assert abs(float(s.alphas_cumprod[499]) - f[1] / f[0]) < 1e-12


def test_zero_terminal_snr():
    betas = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000, 0.00085, 0.012))
    abar = torch.cumprod(1 - betas, 0)
    assert abs(float(abar[-1])) < 1e-12
    assert abs(float(abar[0]) - float(1 - make_betas("scaled_linear", 1000, 0.00085, 0.012)[0])) < 1e-9


def test_add_noise_uses_each_items_own_timestep():
    s = NoiseSchedule.from_name("linear", 1000)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = s.add_noise(x0, noise, t)
    for i in range(3):
        a = s.alphas_cumprod[t[i]]
        torch.testing.assert_close(xt[i], (a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i]).float())


@pytest.mark.parametrize(
    "t, match",
    [(torch.tensor([1000]), r"\[0, 999\]"), (torch.tensor([-1]), r"\[0, 999\]"), (torch.tensor([1, 2]), "shape")],
)
def test_add_noise_rejects_bad_timesteps(t, match):
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ConfigError, match=match):
        s.add_noise(torch.zeros(1, 3), torch.zeros(1, 3), t)


def test_add_noise_rejects_non_finite_and_mismatched():
    s = NoiseSchedule.from_name("linear", 1000)
    with pytest.raises(ConfigError, match="x0"):
        s.add_noise(torch.tensor([[float("nan")]]), torch.zeros(1, 1), torch.tensor([3]))
    with pytest.raises(ConfigError, match="same shape"):
        s.add_noise(torch.zeros(1, 2), torch.zeros(1, 3), torch.tensor([3]))


def test_unknown_schedule_names_the_allowed_values():
    with pytest.raises(ConfigError, match="beta_schedule='cosine'.*'squaredcos_cap_v2'"):
        make_betas("cosine", 1000)


@settings(max_examples=50, deadline=None)
@given(abar=st.floats(1e-4, 1 - 1e-4), seed=st.integers(0, 2**16))
def test_parametrizations_round_trip(abar, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    a, s = abar**0.5, (1 - abar) ** 0.5
    xt = a * x0 + s * eps
    v = P.v_from_x0_eps(x0, eps, a, s)
    for kind, out in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        pred = P.split_output(out, xt, a, s, kind)
        torch.testing.assert_close(pred.x0, x0, rtol=1e-6, atol=1e-6 / a)
        torch.testing.assert_close(pred.eps, eps, rtol=1e-6, atol=1e-6 / s)
        torch.testing.assert_close(P.training_target(x0, eps, a, s, kind), out)


def test_spacings():
    assert spaced_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert spaced_timesteps(1000, 10, "leading", steps_offset=1)[0] == 901
    assert spaced_timesteps(1000, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert spaced_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # N that does not divide T, and N = T
    assert len(spaced_timesteps(1000, 3, "trailing")) == 3 and spaced_timesteps(1000, 3, "trailing")[-1] >= 0
    assert spaced_timesteps(7, 7, "leading").tolist() == list(range(6, -1, -1))
    with pytest.raises(ConfigError, match="num_inference_steps=1001"):
        spaced_timesteps(1000, 1001)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        spaced_timesteps(1000, 10, "log")
