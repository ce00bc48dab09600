"""The pixel super-resolution pipeline: tiles blended without seams (tiled == untiled for a pointwise network),
padding and crop-back of any size, the condition's noise, bad input; ``diffusekit upscale`` on such a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.pipelines.super_resolution import (
    SuperResolutionPipeline,
    noise_condition,
    save_sr_pipeline,
    upsample_condition,
)
from diffusekit.samplers.config import SamplerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(in_channels=2, out_channels=1, channels=(8, 16, 16), layers_per_block=1, attention_levels=(False,) * 3,
            num_heads=(1, 1, 1), norm_groups=4, mid_attention=False, sample_size=16)  # fmt: skip


class Pointwise(nn.Module):
    """A stand-in network whose output at a pixel depends on that pixel only (and the time): tiling it with
    blended windows must reproduce the untiled result."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.mix = nn.Conv2d(config.in_channels, config.out_channels, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t, *, class_labels=None, concat=None):
        scale = 1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(self.mix(torch.cat([x, concat], 1))) * scale


def _pipe(net: nn.Module, scale: int = 2, levels: int = 0) -> SuperResolutionPipeline:
    return SuperResolutionPipeline(net.eval(), SamplerConfig(sampler="ddpm", timestep_spacing="trailing"),
                                   scale=scale, max_noise_level=levels)  # fmt: skip


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_tiled_equals_untiled_for_a_pointwise_network(sampler):
    pipe = _pipe(Pointwise(UNetConfig(**TINY)))
    image = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=4, sampler=sampler, show_progress=False)
    whole = pipe(image, generator=torch.Generator().manual_seed(3), **kw).images
    tiled = pipe(image, generator=torch.Generator().manual_seed(3), tile=4, tile_overlap=2, **kw).images
    assert whole.shape == tiled.shape == (1, 1, 24, 20)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)  # float rounding of the blend only
    # a control: another seed changes the image, so the comparison above can fail
    other = pipe(image, generator=torch.Generator().manual_seed(4), **kw).images
    assert (other - whole).abs().max() > 1e-2


def test_tiles_of_a_real_unet_stay_close_and_cover_every_pixel():
    torch.manual_seed(0)
    pipe = _pipe(UNet(UNetConfig(**TINY)))
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=2, sampler="ddim", show_progress=False)
    whole = pipe(image, generator=torch.Generator().manual_seed(3), **kw).images
    tiled = pipe(image, generator=torch.Generator().manual_seed(3), tile=8, tile_overlap=4, **kw).images
    assert tiled.shape == whole.shape == (1, 1, 32, 32)
    assert float((tiled - whole).abs().mean()) < 0.1  # a 3x3-conv network near the window edges only


def test_sizes_that_are_not_multiples_are_padded_and_cropped_back():
    torch.manual_seed(0)
    pipe = _pipe(UNet(UNetConfig(**TINY)))  # 3 levels: outputs must be multiples of 4, inputs of 2
    assert pipe.input_multiple == 2
    out = pipe(torch.rand(2, 1, 5, 7), steps=1, show_progress=False).images
    assert out.shape == (2, 1, 10, 14)


def test_noise_condition_level_zero_is_clean_and_level_k_is_eq4():
    schedule = SamplerConfig().schedule()
    cond, noise = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    out = noise_condition(cond, torch.tensor([0, 1, 200]), noise, schedule)
    assert torch.equal(out[0], cond[0])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # the default linear betas
    for i, k in ((1, 1), (2, 200)):
        a = abar[k - 1]
        torch.testing.assert_close(out[i], np.sqrt(a) * cond[i] + np.sqrt(1 - a) * noise[i], rtol=0, atol=1e-5)
    up = upsample_condition(torch.full((1, 1, 3, 3), 0.25), 4)
    torch.testing.assert_close(up, torch.full((1, 1, 12, 12), 0.25))


def test_bad_input_is_refused_naming_the_argument():
    pipe = _pipe(Pointwise(UNetConfig(**{**TINY, "num_classes": 11})), levels=10)
    with pytest.raises(ConfigError, match="noise_level must be in \\[0, 10\\]"):
        pipe(torch.rand(1, 1, 4, 4), noise_level=11, show_progress=False)
    with pytest.raises(ConfigError, match="1 channel"):
        pipe(torch.rand(1, 3, 4, 4), show_progress=False)
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        pipe(torch.full((1, 1, 4, 4), 2.0), show_progress=False)
    with pytest.raises(ConfigError, match="pass tile"):
        pipe(torch.rand(1, 1, 300, 300), show_progress=False)
    with pytest.raises(ConfigError, match="max_noise_level=3 does not fit"):
        _pipe(Pointwise(UNetConfig(**{**TINY, "num_classes": 11})), levels=3)


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def model(tmp_path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    save_sr_pipeline(_pipe(UNet(UNetConfig(**{**TINY, "num_classes": 6})), scale=2, levels=5), folder)
    return folder


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, [Path(p) for p in out.out.splitlines() if p], out.err


def test_cli_upscales_a_pixel_model_any_size_and_mode(model, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA").save(src)
    code, paths, err = _run(["upscale", "--model", str(model), str(src), "--out", str(tmp_path / "out"), "--steps",
                             "2", "--noise-level", "3", "--scale", "2"], capsys)  # fmt: skip
    assert code == 0, err
    assert "converted to L" in err
    with Image.open(paths[0]) as im:
        assert im.size == (14, 10) and im.mode == "L"  # 7x5 padded to 8x6, upscaled, cropped back
    code, again, err = _run(["upscale", "--replay", str(paths[0])], capsys)
    assert code == 0 and "identical" in err, err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scale", "4"], "--scale 4: this model was trained to upscale by 2 only"),
        (["--noise-level", "6"], "--noise-level must be in [0, 5]"),
        (["--prompt", "a cat"], "--prompt applies to the Stable Diffusion x4 upscaler only"),
    ],
)
def test_cli_errors_name_the_option(model, tmp_path, capsys, options, message):
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(src)
    code, paths, err = _run(["upscale", "--model", str(model), str(src), "--out", str(tmp_path / "out"), "--steps",
                             "1", *options], capsys)  # fmt: skip
    assert code == 2 and f"diffusekit upscale: error: {message}" in err, err
    assert not paths and not (tmp_path / "out").exists()
