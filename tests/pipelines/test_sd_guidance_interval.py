"""Guidance limited to an interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
Interval Improves Sample and Distribution Quality in Diffusion Models") in the Stable Diffusion pipelines, on
the tiny fixture models: no interval and an interval holding every level are today's images bit for bit; an
interval above every level is the conditional model alone, i.e. guidance 1; one in between guides exactly the
steps whose sigma lies inside it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.pipelines import loading
from diffusekit.pipelines.denoise import grid_for, sampler_for
from diffusekit.pipelines.img2img import ImageToImage
from diffusekit.pipelines.inpaint import Inpaint
from diffusekit.pipelines.sdxl import ImageToImageXL, TextToImageXL
from diffusekit.pipelines.text_to_image import TextToImage

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STEPS = 3
ABOVE_ALL = (1e6, math.inf)  # every sigma of SD's schedule (at most ~15) is below this
EVERY = (0.0, math.inf)


@pytest.fixture(scope="module")
def folders(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines"


@pytest.fixture(scope="module")
def sd(folders):
    return loading.load_pipeline(folders / "stable_diffusion")


@pytest.fixture(scope="module")
def sd_inpaint(folders):
    return loading.load_pipeline(folders / "stable_diffusion_inpaint")


@pytest.fixture(scope="module")
def sdxl(folders):
    return loading.load_pipeline(folders / "stable_diffusion_xl")


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    return image, mask


def _runner(kind: str, sd, sd_inpaint, sdxl):
    """A function(**kw) -> latents of one pipeline on fixed inputs and seed."""
    image, mask = _inputs()
    common = dict(steps=STEPS, show_progress=False)
    calls = {
        "txt2img": lambda kw: TextToImage(sd)("a cat", height=16, width=16, **common, **kw),
        "img2img": lambda kw: ImageToImage(sd)("a cat", image, strength=1.0, **common, **kw),
        "inpaint-blended": lambda kw: Inpaint(sd)("a cat", image, mask, **common, **kw),
        "inpaint-unet": lambda kw: Inpaint(sd_inpaint)("a cat", image, mask, **common, **kw),
        "sdxl-txt2img": lambda kw: TextToImageXL(sdxl)("a cat", height=16, width=16, **common, **kw),
        "sdxl-img2img": lambda kw: ImageToImageXL(sdxl)("a cat", image, strength=1.0, **common, **kw),
    }

    def run(**kw) -> torch.Tensor:
        return calls[kind]({"generator": torch.Generator().manual_seed(5), **kw}).latents

    return run


KINDS = ["txt2img", "img2img", "inpaint-blended", "inpaint-unet", "sdxl-txt2img", "sdxl-img2img"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_interval_and_every_level_are_bit_identical_to_plain_guidance(kind, sd, sd_inpaint, sdxl):
    run = _runner(kind, sd, sd_inpaint, sdxl)
    plain = run(guidance_scale=7.5)
    assert torch.equal(run(guidance_scale=7.5, guidance_interval=None), plain)
    assert torch.equal(run(guidance_scale=7.5, guidance_interval=EVERY), plain)
    assert torch.equal(run(guidance_scale=7.5, guidance_interval=[0, math.inf]), plain)  # any sequence


@pytest.mark.parametrize("kind", KINDS)
def test_an_interval_above_every_level_is_the_conditional_model_alone(kind, sd, sd_inpaint, sdxl):
    """Outside the interval the model is the conditional half alone: guidance 1 with the same seed, bit for bit
    (and not the guided image, which would make this test pass for a gate that is never consulted)."""
    run = _runner(kind, sd, sd_inpaint, sdxl)
    unguided = run(guidance_scale=1.0)
    outside = run(guidance_scale=7.5, guidance_interval=ABOVE_ALL)
    assert torch.equal(outside, unguided)
    assert (outside - run(guidance_scale=7.5)).abs().max() > 1e-3


def _grid_sigmas(pipe_sd, sampler: str) -> list[float]:
    config = sampler_for(pipe_sd.sampler_config, sampler, None)
    sigma = config.sigma_map()
    return [sigma(t) for t in grid_for(config, STEPS).timesteps]


@pytest.mark.parametrize("kind", ["txt2img", "inpaint-unet", "sdxl-txt2img"])
def test_an_interval_in_between_guides_exactly_the_steps_inside_it(kind, sd, sd_inpaint, sdxl):
    """Euler evaluates the network once per step, at the grid's sigma: the doubled batch [uncond; cond] must
    reach the U-Net at exactly the steps with lo < sigma <= hi, and the image differs from both neighbours."""
    pipe_sd = {"txt2img": sd, "inpaint-unet": sd_inpaint, "sdxl-txt2img": sdxl}[kind]
    sigmas = _grid_sigmas(pipe_sd, "euler")
    assert len(sigmas) == STEPS and sigmas == sorted(sigmas, reverse=True)
    lo, hi = (sigmas[2] + sigmas[1]) / 2, (sigmas[1] + sigmas[0]) / 2  # the middle step alone
    batches: list[int] = []
    hook = pipe_sd.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    run = _runner(kind, sd, sd_inpaint, sdxl)
    try:
        middle = run(guidance_scale=7.5, guidance_interval=(lo, hi), sampler="euler")
        assert batches == [1, 2, 1]
        batches.clear()
        upper = run(guidance_scale=7.5, guidance_interval=(lo, math.inf), sampler="euler")
        assert batches == [2, 2, 1]
    finally:
        hook.remove()
    everywhere = run(guidance_scale=7.5, sampler="euler")
    nowhere = run(guidance_scale=1.0, sampler="euler")
    for other in (everywhere, nowhere, upper):
        assert (middle - other).abs().max() > 1e-4


def test_the_upper_end_is_inclusive_and_the_lower_end_exclusive(sd):
    """lo < sigma <= hi: an interval ending exactly at the first step's sigma guides it, one starting there does
    not (the SD-XL setting of the paper, (0.28, 5.42], reads the same way)."""
    top = _grid_sigmas(sd, "euler")[0]
    batches: list[int] = []
    hook = sd.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    run = _runner("txt2img", sd, None, None)
    try:
        run(guidance_scale=7.5, guidance_interval=(0.0, top), sampler="euler")
        assert batches == [2, 2, 2]
        batches.clear()
        run(guidance_scale=7.5, guidance_interval=(top, math.inf), sampler="euler")
        assert batches == [1, 1, 1]
    finally:
        hook.remove()


@pytest.mark.parametrize("bad", [(5.0, 1.0), (1.0, 1.0), (-1.0, 2.0), (math.nan, 1.0), "12", (0.0, "x")])
def test_a_bad_interval_is_refused_naming_the_argument(sd, bad):
    with pytest.raises(ConfigError, match="guidance_interval"):
        TextToImage(sd)("a cat", height=16, width=16, steps=1, guidance_interval=bad, show_progress=False)
