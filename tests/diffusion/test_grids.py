"""Inference grids: numpy's float64 arithmetic for the spaced timesteps, and refusing grids that do not descend.

numpy is the oracle here: implementations built on it round ``numpy.linspace`` / ``numpy.arange`` values
half to even on the float64 value numpy computed, so a point that lands a hair below x.5 rounds down.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusekit.diffusion.grids import Grid, arange64, linspace64, spaced_timesteps
from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.samplers.config import SamplerConfig, build_grid


@pytest.mark.parametrize("T", [7, 100, 999, 1000, 4000])
def test_linspace64_and_arange64_are_numpys_arithmetic_bit_for_bit(T):
    for n in range(1, min(T, 1000) + 1):
        assert linspace64(0, T - 1, n).numpy().tobytes() == np.linspace(0, T - 1, n).tobytes(), n
        assert arange64(T, 0, -T / n).numpy().tobytes() == np.arange(T, 0, -T / n).tobytes(), n


def test_a_point_a_hair_below_a_half_integer_rounds_down():
    # exact arithmetic puts the middle of 27 points over [0, 999] at 499.5 (half to even: 500); numpy computes
    # 13 * (999 / 26) = 499.49999999999994, which rounds to 499 -- and so does the reference's grid
    assert 13 * (999 / 26) < 499.5 and 13 * 999 / 26 == 499.5
    t = spaced_timesteps(1000, 27, "linspace")
    assert 499 in t.tolist() and 500 not in t.tolist()
    # trailing spacing, 48 steps: numpy's arange gives 937.4999999999999 where exact arithmetic gives 937.5
    t = spaced_timesteps(1000, 48, "trailing")
    assert 936 in t.tolist() and 937 not in t.tolist()  # round(937.4999...) - 1


@pytest.mark.parametrize("T", [100, 1000])
def test_every_spacing_matches_numpy_for_every_step_count(T):
    for n in range(1, T + 1):
        linspace = np.linspace(0, T - 1, n).round()[::-1]
        assert spaced_timesteps(T, n, "linspace").tolist() == linspace.tolist(), n
        # numpy's arange can give n + 1 values (the last one is t = -1 after the shift): the n steps are the first n
        trailing = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
        assert spaced_timesteps(T, n, "trailing").tolist() == trailing.tolist(), n
        offset = int(n < T)  # (an offset with n = T would push the first step past T - 1)
        leading = (np.arange(0, n) * (T // n)).round()[::-1] + offset
        assert spaced_timesteps(T, n, "leading", steps_offset=offset).tolist() == leading.tolist(), n
        # fractional linspace (Euler-type samplers) keeps numpy's float32 values
        frac = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        assert spaced_timesteps(T, n, "linspace", integer=False).tolist() == frac.tolist(), n


SD15 = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1}  # fmt: skip


@pytest.mark.parametrize("n", [12, 26, 30, 46])
def test_reference_dpm_solver_linspace_grid_rounds_on_numpys_value(n):
    """The reference's DPM-Solver: round(numpy.linspace(0, T-1, N+1)) reversed, last dropped (N = 26: 27 points,
    the middle one 499.49999... -> 499)."""
    cfg = scheduler_from_diffusers(
        {"_class_name": "DPMSolverMultistepScheduler", **SD15, "timestep_spacing": "linspace"}
    )
    expected = np.linspace(0, 999, n + 1).round()[::-1][:-1]
    assert build_grid(cfg, n).timesteps.tolist() == expected.tolist()


def test_reference_dpm_solver_karras_grid_calls_the_network_at_integer_times():
    cfg = scheduler_from_diffusers(
        {"_class_name": "DPMSolverMultistepScheduler", **SD15, "use_karras_sigmas": True}
    )
    grid = build_grid(cfg, 20)
    assert torch.equal(grid.timesteps, grid.timesteps.round())
    assert grid.timesteps[0] == 999 and grid.timesteps[-1] == 0


SCHEDULE = NoiseSchedule.from_name("linear", 1000)


def test_increasing_timesteps_are_refused_with_their_position():
    with pytest.raises(ConfigError, match=r"timesteps\[2\]=600 > timesteps\[1\]=500"):
        Grid.on_schedule(SCHEDULE, torch.tensor([900, 500, 600, 100]))
    abar = SCHEDULE.alphas_cumprod
    with pytest.raises(ConfigError, match=r"timesteps\[1\]"):
        Grid(torch.tensor([10.0, 20.0]), abar[[10, 20]], torch.tensor([abar[20], 1.0]))


def test_increasing_noise_levels_and_steps_that_add_noise_are_refused():
    abar = SCHEDULE.alphas_cumprod
    with pytest.raises(ConfigError, match=r"step 1 starts noisier than step 0"):
        Grid(torch.tensor([20.0, 10.0]), abar[[10, 20]], torch.tensor([abar[20], 1.0]))
    with pytest.raises(ConfigError, match=r"step 0 adds noise"):
        Grid(torch.tensor([20.0, 10.0]), abar[[20, 10]], torch.tensor([abar[30], 1.0]))
    with pytest.raises(ConfigError, match=r"noise levels must decrease"):
        Grid.from_sigmas(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ConfigError, match=r"alphas_cumprod_next\[1\] is nan"):
        Grid(torch.tensor([20.0, 10.0]), abar[[20, 10]], torch.tensor([abar[10], float("nan")]))
    # equal neighbours are fine: a step from t = 0 to abar_0 (set_alpha_to_one=False) and repeated Karras times
    Grid(torch.tensor([0.0]), abar[[0]], abar[[0]])
    Grid(torch.tensor([3.0, 3.0]), abar[[3, 3]], abar[[3, 3]])


def test_built_grids_descend():
    for sampler in ("ddpm", "ddim", "euler", "dpmpp_2m", "pndm"):
        for spacing in ("leading", "trailing", "linspace"):
            grid = build_grid(SamplerConfig(sampler=sampler, timestep_spacing=spacing, steps_offset=1), 61)
            assert (grid.timesteps[1:] <= grid.timesteps[:-1]).all()
