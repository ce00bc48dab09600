"""The power-function EMA of EDM2 (Karras et al. 2024, sec. 3.1 and appendix C): the running average against the
closed form of its profile, the width of that profile against sigma_rel, and post-hoc reconstruction from snapshots
against averages tracked directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.training.power_ema import (
    PowerEMA,
    Snapshot,
    first_average,
    gamma_of_sigma_rel,
    list_snapshots,
    reconstruct,
    reconstruction_weights,
)


class Weights(nn.Module):
    """A "model" that is one float64 parameter vector (and an integer buffer, which is not averaged)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def profile_weights(t: int, gamma: float) -> np.ndarray:
    """Weight of steps 1..t in the average: the profile (gamma + 1) tau^gamma / t^(gamma + 1) integrated over
    (i - 1, i], i.e. (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1)."""
    i = np.arange(1, t + 1, dtype=np.float64)
    return (i / t) ** (gamma + 1) - ((i - 1) / t) ** (gamma + 1)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_the_average_of_a_scalar_sequence_is_the_closed_form_of_the_profile(sigma_rel):
    values = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Weights(1)
    ema = PowerEMA(model, [sigma_rel])
    for t, v in enumerate(values, start=1):
        with torch.no_grad():
            model.w.fill_(v)
        ema.update(model, t)
        if t in (1, 17, 300):
            expected = float(profile_weights(t, ema.gammas[0]) @ values[:t].numpy())
            assert float(ema.averages[0].w) == pytest.approx(expected, rel=1e-9, abs=1e-12), t
    assert float(ema.averages[0].w) != pytest.approx(float(values.mean()), abs=1e-3)  # not a plain mean


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.10, 0.28])
def test_gamma_gives_a_profile_whose_relative_width_is_sigma_rel(sigma_rel):
    """The standard deviation of tau under the profile, divided by t, measured by numerical integration."""
    gamma = gamma_of_sigma_rel(sigma_rel)
    tau = np.linspace(0.0, 1.0, 2_000_001)
    p = (gamma + 1) * tau**gamma
    integrate = lambda f: float(np.sum((f[1:] + f[:-1]) / 2) * (tau[1] - tau[0]))  # noqa: E731 (trapezoid rule)
    assert integrate(p) == pytest.approx(1.0, rel=1e-6)
    mean = integrate(tau * p)
    assert math.sqrt(integrate((tau - mean) ** 2 * p)) == pytest.approx(sigma_rel, rel=1e-5)


def test_the_tracked_exponents_are_the_papers():
    # EDM2, sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2000 steps of a random walk in 64 "weights", averages at sigma_rel 0.05 and 0.10 saved every 100 steps,
    and averages at 0.06, 0.07 and 0.15 tracked directly for comparison (also kept at step 1000)."""
    folder = tmp_path_factory.mktemp("power_ema")
    model = Weights(64)
    tracked, direct = PowerEMA(model, [0.05, 0.10]), PowerEMA(model, [0.06, 0.07, 0.15])
    g = torch.Generator().manual_seed(0)
    halfway = {}
    for t in range(1, 2001):
        with torch.no_grad():
            model.w.add_(torch.randn(64, generator=g, dtype=torch.float64))
            model.count.add_(1)
        tracked.update(model, t)
        direct.update(model, t)
        if t % 100 == 0:
            tracked.save_snapshot(folder, t)
        if t == 1000:
            halfway = {s: avg.w.detach().clone() for s, avg in zip(direct.sigma_rels, direct.averages)}
    final = {s: avg.w.detach().clone() for s, avg in zip(tracked.sigma_rels + direct.sigma_rels,
                                                          tracked.averages + direct.averages)}  # fmt: skip
    return list_snapshots(folder), final, halfway, float(model.w.detach().abs().max())


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a.double() - b.double()).abs().max()) / scale


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_reconstructing_a_tracked_profile_reproduces_its_average(run, sigma_rel):
    snapshots, final, _, scale = run
    assert [s.step for s in snapshots] == list(range(100, 2001, 100))
    state, error = reconstruct(snapshots, sigma_rel)
    assert error < 1e-6
    assert relative_error(state["w"], final[sigma_rel], scale) < 1e-6  # measured 2.5e-8: float32 snapshots
    assert int(state["count"]) == 2000  # the integer buffer is the newest snapshot's, not a weighted sum


@pytest.mark.parametrize("sigma_rel", [0.06, 0.07, 0.15])
def test_reconstructing_an_intermediate_profile_matches_a_directly_tracked_average(run, sigma_rel):
    """Measured: 5.3e-5, 5.8e-5 and 1.4e-4 of the largest weight (profile errors 0.22 %, 0.25 %, 0.58 %); averages
    0.01 sigma_rel apart differ by 1.7e-2, so the bound 5e-4 separates them."""
    snapshots, final, _, scale = run
    state, error = reconstruct(snapshots, sigma_rel)
    assert error < 0.01
    assert relative_error(state["w"], final[sigma_rel], scale) < 5e-4
    assert relative_error(final[0.06], final[0.07], scale) > 1e-2  # the bound can tell neighbouring profiles apart


def test_a_wrong_gamma_fails_the_reconstruction(run):
    """Controls: snapshots read with the wrong sigma_rels, or the wrong target, miss the directly tracked average."""
    snapshots, final, _, scale = run
    mislabeled = [Snapshot(s.path, s.step, (0.06, 0.12)) for s in snapshots]
    assert relative_error(reconstruct(mislabeled, 0.07)[0]["w"], final[0.07], scale) > 5e-3
    assert relative_error(reconstruct(snapshots, 0.06)[0]["w"], final[0.07], scale) > 5e-3


def test_reconstruction_at_an_earlier_step_uses_the_snapshots_up_to_it(run):
    snapshots, _, halfway, scale = run
    state, _ = reconstruct(snapshots, 0.07, step=1000)
    assert relative_error(state["w"], halfway[0.07], scale) < 5e-4
    with pytest.raises(ConfigError, match="step 50"):
        reconstruct(snapshots, 0.07, step=50)


def test_reconstruction_weights_of_a_tracked_profile_pick_that_snapshot():
    steps, gammas = [100, 200, 100, 200], [gamma_of_sigma_rel(s) for s in (0.05, 0.05, 0.1, 0.1)]
    x, error = reconstruction_weights(steps, gammas, 200, gammas[3])
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-9)
    assert error < 1e-6
    x, error = reconstruction_weights(steps, gammas, 200, gamma_of_sigma_rel(0.07))
    assert 1e-4 < error < 0.1  # an intermediate profile is approximated, not reproduced


def test_the_tracked_averages_round_trip_through_a_state_dict():
    model = Weights(3)
    a = PowerEMA(model, [0.05, 0.1])
    with torch.no_grad():
        model.w.fill_(2.0)
    a.update(model, 1)
    b = PowerEMA(Weights(3), [0.05, 0.1])
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x.w, y.w) for x, y in zip(a.averages, b.averages))
    assert set(a.state_dict()) == {"0/w", "0/count", "1/w", "1/count"}


def test_options_and_files_are_checked(tmp_path):
    for bad in ([], [0.5], [0.0], [0.05, 0.05], "0.05", [float("nan")]):
        with pytest.raises(ConfigError, match="ema.sigma_rels"):
            PowerEMA(Weights(1), bad)
    with pytest.raises(ConfigError, match="sigma_rel"):
        gamma_of_sigma_rel(0.3)
    with pytest.raises(ConfigError, match="not a folder"):
        list_snapshots(tmp_path / "missing")
    (tmp_path / "step-00000010.safetensors").write_bytes(b"garbage!")
    with pytest.raises(WeightsError):
        list_snapshots(tmp_path)


def test_the_checkpoint_dict_keeps_the_first_average_under_the_models_names():
    model = Weights(3)
    a = PowerEMA(model, [0.05, 0.1, 0.2])
    with torch.no_grad():
        model.w.fill_(2.0)
    a.update(model, 1)
    with torch.no_grad():
        model.w.fill_(5.0)
    a.update(model, 2)
    saved = a.checkpoint_dict()
    assert set(first_average(saved)) == {"w", "count"}  # loads into the bare model
    Weights(3).load_state_dict(first_average(saved))
    b = PowerEMA(Weights(3), [0.05, 0.1, 0.2])
    b.load_checkpoint_dict(saved)
    for x, y in zip(a.averages, b.averages):
        assert torch.equal(x.w, y.w)
    assert len({float(avg.w[0]) for avg in b.averages}) == 3  # three different averages came back
