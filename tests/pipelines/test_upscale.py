"""The Stable Diffusion x4 upscaler on the tiny fixture model (fixtures README section 10): the reference's
numbers, the U-Net's text-only attention, noise levels, padding, determinism, tiling and the loader."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.unet_config import unet_from_diffusers, unet_to_diffusers
from diffusekit.io.weights import load_weights, read_json
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.loading import UPSCALER_FOLDER, identify, load_pipeline
from diffusekit.pipelines.upscale import StableDiffusionUpscaler, Upscale, pad_to_multiple

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
MODEL = FIXTURES / "pipelines" / "stable_diffusion_upscale"
CASES = sorted((FIXTURES / "pipelines" / "cases").glob("upscale_*"))
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason="shared fixtures not found")


@pytest.fixture(scope="module")
def sd() -> StableDiffusionUpscaler:
    return load_pipeline(MODEL)


def _run(sd, image, seed=0, **kw):
    kw = {"steps": 3, "guidance_scale": 1.0, "show_progress": False, **kw}
    return Upscale(sd)("a cat", image, generator=torch.Generator().manual_seed(seed), **kw)


def _smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(1, 3, max(h // 4, 1), max(w // 4, 1), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")


# ---- the reference's numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_upscale_matches_reference_case(case: Path, sd: StableDiffusionUpscaler):
    meta, ref = read_json(case / "meta.json"), load_weights(case / "io.safetensors")
    sd = dataclasses.replace(sd, sampler_config=scheduler_from_diffusers(read_json(case / "scheduler_config.json")))
    out = Upscale(sd)(
        meta["prompt"], ref["image"], negative_prompt=meta["negative_prompt"], noise_level=meta["noise_level"],
        steps=meta["num_inference_steps"], guidance_scale=meta["guidance_scale"],
        generator=torch.Generator().manual_seed(meta["generator_seed"]), show_progress=False,
    )  # fmt: skip
    assert sd.max_noise_level == meta["max_noise_level"]
    torch.testing.assert_close(out.start, ref["latents_in"], rtol=0, atol=0)  # the second draw of the generator
    torch.testing.assert_close(out.latents, ref["final_latents"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.images.permute(0, 2, 3, 1), ref["images"], rtol=1e-3, atol=1e-3)


def test_text_only_attention_is_what_makes_the_reference_output():
    """Control: the same weights in a U-Net whose first attentions look at the image (shapes allow it: the
    text is as wide as the features) miss the reference's U-Net output."""
    case = CASES[0]
    ref = load_weights(case / "io.safetensors")
    config = unet_from_diffusers(read_json(MODEL / "unet" / "config.json"))
    assert config.text_only_attention == (True, True, False)
    state = load_weights(MODEL / "unet" / "diffusion_pytorch_model.safetensors")
    x, t, out = ref["unet_sample_in"][0], ref["unet_timestep"][0], ref["unet_out"][0]
    context = torch.cat([ref["negative_prompt_embeds"], ref["prompt_embeds"]])
    labels = ref["class_labels"]
    errors = []
    for c in (config, dataclasses.replace(config, text_only_attention=None)):
        unet = UNet(c).eval()
        unet.load_state_dict(state)
        with torch.no_grad():
            errors.append((unet(x, t, context=context, class_labels=labels) - out).abs().max().item())
    assert errors[0] < 1e-4 < 1e-2 < errors[1]


def test_only_cross_attention_translation():
    base = read_json(MODEL / "unet" / "config.json")
    config = unet_from_diffusers(base)
    back = unet_to_diffusers(config)
    assert back["only_cross_attention"] == [True, True, False]
    assert unet_from_diffusers(back) == config
    assert unet_from_diffusers({**base, "only_cross_attention": False}).text_only_attention is None
    flat = {**base, "only_cross_attention": True, "mid_block_only_cross_attention": False}
    assert unet_from_diffusers(flat).text_only_attention == (True, True, True)
    with pytest.raises(ConfigError, match="mid_block_only_cross_attention"):  # mid block follows the one flag
        unet_from_diffusers({**base, "only_cross_attention": True})
    with pytest.raises(ConfigError, match="only_cross_attention"):
        unet_from_diffusers({**base, "only_cross_attention": [True, False]})


# ---- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [-1, 351, 2.5, True, "20"])
def test_noise_level_outside_the_schedule_is_refused(sd, level):
    with pytest.raises(ConfigError, match=r"noise_level must be .*\[0, 350\]"):
        _run(sd, torch.rand(1, 3, 8, 8), noise_level=level)


@pytest.mark.parametrize("level", [0, 350])
def test_noise_level_bounds_are_accepted(sd, level):
    assert _run(sd, torch.rand(1, 3, 8, 8), noise_level=level, steps=1).images.shape == (1, 3, 32, 32)


def test_too_large_for_one_pass_names_tile(sd):
    with pytest.raises(ConfigError, match="tile"):
        _run(sd, torch.zeros(1, 3, 520, 520))


@pytest.mark.parametrize(("tile", "overlap"), [(6, None), (0, None), (8, 8), (8, 2), (8.0, None), (1024, None)])
def test_bad_tiles_are_refused(sd, tile, overlap):
    with pytest.raises(ConfigError, match="tile"):
        _run(sd, torch.rand(1, 3, 16, 16), tile=tile, tile_overlap=overlap)


# ---- behaviour -------------------------------------------------------------------------------------------
def test_output_shape_and_determinism_per_seed(sd):
    image = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    a, b, c = _run(sd, image, seed=5), _run(sd, image, seed=5), _run(sd, image, seed=6)
    assert a.images.shape == (1, 3, 32, 48)
    assert 0 <= a.images.min() and a.images.max() <= 1
    assert torch.equal(a.images, b.images)
    assert (a.images - c.images).abs().mean() > 0.05


def test_odd_sizes_are_padded_and_cropped_back(sd):
    """9x13 pixels are not multiples of the U-Net's 4: the result is 36x52, the run on the edge-padded 12x16
    image cut to size (so nothing but the padding is lost)."""
    image = torch.rand(1, 3, 9, 13, generator=torch.Generator().manual_seed(4))
    padded = pad_to_multiple(image, 4)
    assert padded.shape[2:] == (12, 16)
    assert torch.equal(padded[:, :, :9, :13], image)
    assert torch.equal(padded[:, :, 11, :13], image[:, :, 8])  # edge rows repeated
    odd, whole = _run(sd, image, steps=1).images, _run(sd, padded, steps=1).images
    assert odd.shape == (1, 3, 36, 52)
    torch.testing.assert_close(odd, whole[:, :, :36, :52], rtol=0, atol=1e-5)


class _PointwiseUNet(torch.nn.Module):
    """A stand-in U-Net whose output at a pixel depends on that pixel only (like a 1x1 conv): with it,
    blended tiles must reproduce the untiled run exactly."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, *, context, class_labels, concat):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        return self.w * x + t * concat.mean(1, keepdim=True) + context.mean() * 0.01


def test_tiles_blend_without_seams_for_a_local_model(sd):
    stub = dataclasses.replace(sd, unet=_PointwiseUNet(sd.unet.config))
    image = _smooth_image(24, 24)
    untiled = _run(stub, image, guidance_scale=3.0)
    tiled = _run(stub, image, guidance_scale=3.0, tile=12, tile_overlap=4)
    torch.testing.assert_close(tiled.latents, untiled.latents, rtol=1e-5, atol=1e-5)


def test_tiled_is_close_to_untiled_on_an_input_that_fits_both_ways(sd):
    """The real network normalises over what it sees, so tiles differ from the whole, but far less than
    another seed does, and the whole image stays in place (no shifted or missing tiles)."""
    image = _smooth_image(16, 16)
    untiled = _run(sd, image, steps=2).images
    tiled = _run(sd, image, steps=2, tile=12, tile_overlap=4).images
    other_seed = _run(sd, image, steps=2, seed=1).images
    assert tiled.shape == untiled.shape == (1, 3, 64, 64)
    assert (tiled - untiled).abs().mean() < 0.3 * (other_seed - untiled).abs().mean()
    one_tile = _run(sd, image, steps=2, tile=16).images  # a tile as large as the image is no tiling
    torch.testing.assert_close(one_tile, untiled, rtol=0, atol=1e-5)


def test_batch_follows_prompts(sd):
    with pytest.raises(ConfigError, match="2 images for 1 prompts"):
        _run(sd, torch.rand(2, 3, 8, 8))


# ---- the loader ------------------------------------------------------------------------------------------
def test_loader_dispatches_on_model_index(sd):
    assert identify(MODEL) == UPSCALER_FOLDER
    assert isinstance(sd, StableDiffusionUpscaler)
    assert sd.scale == 4 and sd.max_noise_level == 350
    assert sd.codec.scaling_factor == pytest.approx(0.08333)
    assert sd.low_res_config.sampler == "ddpm"


def _copy_model(tmp_path: Path) -> Path:
    folder = tmp_path / "upscaler"
    shutil.copytree(MODEL, folder)
    return folder


def test_loader_needs_the_low_res_scheduler(tmp_path):
    folder = _copy_model(tmp_path)
    shutil.rmtree(folder / "low_res_scheduler")
    with pytest.raises(WeightsError, match="low_res_scheduler"):
        load_pipeline(folder)


@pytest.mark.parametrize("level", [351, -1, "350", None])
def test_loader_checks_max_noise_level_against_the_unet(tmp_path, level):
    folder = _copy_model(tmp_path)
    index = read_json(folder / "model_index.json")
    (folder / "model_index.json").write_text(json.dumps({**index, "max_noise_level": level}))
    with pytest.raises(ConfigError, match="max_noise_level"):
        load_pipeline(folder)


def test_save_pipeline_writes_an_upscaler_folder_that_loads_back(sd, tmp_path):
    from diffusekit.pipelines.loading import save_pipeline

    saved = save_pipeline(sd, tmp_path / "saved")
    assert read_json(saved / "model_index.json")["_class_name"] == "StableDiffusionUpscalePipeline"
    again = load_pipeline(saved)
    assert isinstance(again, StableDiffusionUpscaler)
    assert again.max_noise_level == sd.max_noise_level
    assert again.low_res_config.schedule().alphas_cumprod.equal(sd.low_res_config.schedule().alphas_cumprod)
    assert again.unet.config == sd.unet.config
    with pytest.raises(ConfigError, match="diffusers folder only"):
        save_pipeline(sd, tmp_path / "one.safetensors")
