"""Guidance limited to an interval of noise levels (Kynkäänniemi et al. 2024): the network time -> sigma map,
the gate, and which sampler steps of a real pipeline are guided."""

from __future__ import annotations

import math

import pytest
import torch

from diffusekit.diffusion.edm import edm_scalings
from diffusekit.diffusion.grids import karras_sigmas
from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.guidance import check_guidance_interval, guided, interval_gate


def test_sigma_at_inverts_the_network_time_of_both_parametrizations():
    edm = SamplerConfig(sampler="heun", preconditioning="edm")
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_noise = edm_scalings(torch.tensor(sigma, dtype=torch.float64)).c_noise.float()  # as the denoiser passes it
        assert edm.sigma_at(c_noise) == pytest.approx(sigma, rel=1e-6)
    vp = SamplerConfig()
    abar = vp.schedule().alphas_cumprod
    for t in (0, 499, 999):
        assert vp.sigma_at(torch.tensor(float(t))) == pytest.approx(math.sqrt((1 - abar[t]) / abar[t]), rel=1e-12)
    halfway = vp.sigma_at(10.5)  # between two training steps: linear between their sigmas
    assert halfway == pytest.approx((vp.sigma_at(10) + vp.sigma_at(11)) / 2, rel=1e-12)


def test_gated_guidance_mixes_inside_and_calls_the_conditional_half_alone_outside():
    calls = []

    def network(x, t, label):
        calls.append(x.shape[0])
        return x * 0 + label.float().reshape(-1, 1)  # the output is the label: uncond 0, cond 2

    zero, two = torch.zeros(3, dtype=torch.long), torch.full((3,), 2)
    model = guided(network, 4.0, {"label": zero}, {"label": two}, gate=lambda t: float(t) > 0.5)
    x = torch.ones(3, 1)
    assert torch.equal(model(x, torch.tensor(1.0)), torch.full((3, 1), 8.0))  # 0 + 4 (2 - 0)
    assert torch.equal(model(x, torch.tensor(0.0)), torch.full((3, 1), 2.0))  # conditional only
    assert calls == [6, 3]


@pytest.mark.parametrize(
    "bad", [(5.0, 1.0), (-1.0, 2.0), (float("nan"), 1.0), ("a", "b"), (1.0,), "12", ("0.28", "5"), (True, 5.0),
            (0, 10**400)],
)  # fmt: skip
def test_bad_intervals_are_refused_with_the_option_name(bad):
    with pytest.raises(ConfigError, match="--guidance-interval"):
        check_guidance_interval(bad, "--guidance-interval")
    assert interval_gate(lambda t: 1.0, None) is None


@pytest.fixture(scope="module")
def edm_pipe() -> UnconditionalPipeline:
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, out_channels=1, channels=(8, 8), layers_per_block=1,
                     attention_levels=(False, False), mid_attention=False, num_heads=(1, 1), num_classes=4,
                     norm_groups=4, sample_size=8)  # fmt: skip
    unet = UNet(cfg).eval()
    with torch.no_grad():  # a fresh U-Net's zero-initialised output layer would make every guidance equal
        for p in unet.parameters():
            p.normal_(0, 0.2)
    return UnconditionalPipeline(unet, SamplerConfig(sampler="heun", preconditioning="edm"))


def run(pipe, interval, guidance=3.0, steps=6):
    seen = []
    forward = pipe.unet.forward

    def recording(x, t, **cond):
        seen.append((float(pipe.sampler_config.sigma_at(t)), x.shape[0]))
        return forward(x, t, **cond)

    pipe.unet.forward = recording
    try:
        out = pipe(2, steps=steps, class_labels=[0, 1], guidance_scale=guidance, guidance_interval=interval,
                   generator=torch.Generator().manual_seed(1), show_progress=False)  # fmt: skip
    finally:
        del pipe.unet.forward
    return out, seen


def test_an_interval_guides_exactly_the_heun_evaluations_inside_it(edm_pipe):
    full, _ = run(edm_pipe, None)
    assert torch.equal(run(edm_pipe, (0.0, math.inf))[0], full)  # every level: the ordinary guidance
    none, _ = run(edm_pipe, (1e4, 1e5))  # no level of the grid (sigma_max 80): no guidance at all
    assert torch.equal(none, run(edm_pipe, None, guidance=1.0)[0])
    lo, hi = 0.5, 10.0
    part, seen = run(edm_pipe, (lo, hi))
    assert not torch.allclose(part, full) and not torch.allclose(part, none)
    # Heun (Karras et al. 2022, Alg. 1) evaluates D at sigma_0..sigma_{N-1} and corrects at sigma_1..sigma_{N-1}
    sigmas = karras_sigmas(0.002, 80.0, 6).tolist()
    evaluated = sorted(sigmas + sigmas[1:])
    assert sorted(s for s, _ in seen) == pytest.approx(evaluated, rel=1e-5)
    guided_at = sorted(s for s, b in seen if b == 4)
    assert guided_at == pytest.approx([s for s in evaluated if lo < s <= hi], rel=1e-5) and guided_at
    assert all(b == 2 for s, b in seen if not lo < s <= hi)
