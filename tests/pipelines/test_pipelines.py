"""Pipelines on the tiny reference models: shapes, seeds, samplers, inpainting variants, bad input."""

from __future__ import annotations

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.io.models import load_unet
from diffusekit.pipelines import loading
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.img2img import ImageToImage
from diffusekit.pipelines.inpaint import Inpaint
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.pipelines.unconditional import UnconditionalPipeline, load_pipeline, save_pipeline
from diffusekit.samplers.config import SAMPLERS, SamplerConfig


@pytest.fixture(scope="module")
def sd(fixtures_dir):
    return loading.load_pipeline(fixtures_dir / "pipelines" / "stable_diffusion")


@pytest.fixture(scope="module")
def sd_inpaint(fixtures_dir):
    return loading.load_pipeline(fixtures_dir / "pipelines" / "stable_diffusion_inpaint")


def image(b=1, h=16, w=16, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_text_to_image_with_every_sampler(sd, sampler):
    out = TextToImage(sd)(["a cat", "a dog"], height=16, width=24, steps=4, sampler=sampler,
                          generator=torch.Generator().manual_seed(0), show_progress=False)  # fmt: skip
    assert out.images.shape == (2, 3, 16, 24)
    assert 0 <= out.images.min() and out.images.max() <= 1
    assert out.images.std() > 0.01  # not a blank image
    assert not torch.equal(out.images[0], out.images[1])


def test_each_image_in_a_batch_equals_the_image_generated_alone(sd):
    t2i = TextToImage(sd)
    kw = dict(height=16, width=16, steps=3, sampler="euler_ancestral", show_progress=False)
    batch = t2i(["a cat", "a dog", "a cow"], generator=generators_from_seeds(10, 3), **kw)
    alone = t2i("a dog", generator=generators_from_seeds(11, 1), **kw)
    # the noise is identical; batched kernels may round differently from a batch of one in the last bits, and
    # which kernel a batch size gets depends on the CPU (1.4e-5 seen here; a wrong image is off by > 0.01)
    torch.testing.assert_close(batch.images[1], alone.images[0], rtol=0, atol=1e-4)
    other = t2i("a dog", generator=generators_from_seeds(12, 1), **kw)
    assert (other.images[0] - alone.images[0]).abs().max() > 0.01
    again = t2i(["a cat", "a dog", "a cow"], generator=generators_from_seeds(10, 3), **kw)
    assert torch.equal(batch.images, again.images)


def test_guidance_changes_the_image(sd):
    t2i = TextToImage(sd)
    kw = dict(height=16, width=16, steps=3, show_progress=False)
    a = t2i("a cat", guidance_scale=1.0, generator=torch.Generator().manual_seed(1), **kw)
    b = t2i("a cat", guidance_scale=7.5, generator=torch.Generator().manual_seed(1), **kw)
    c = t2i("a cat", guidance_scale=7.5, negative_prompt="blurry", generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.allclose(a.latents, b.latents) and not torch.allclose(b.latents, c.latents)


def test_img2img_strength(sd):
    i2i = ImageToImage(sd)
    img = image()
    calls = []
    i2i("a cat", img, strength=0.5, steps=10, callback=calls.append, show_progress=False)
    assert len(calls) == 5
    with pytest.raises(ConfigError, match="strength"):
        i2i("a cat", img, strength=1.5, steps=10, show_progress=False)
    with pytest.raises(ConfigError, match="runs no step"):
        i2i("a cat", img, strength=0.05, steps=10, show_progress=False)


def test_inpaint_with_an_ordinary_unet_keeps_the_unmasked_latents(sd):
    img = image()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1  # repaint the left half
    out = Inpaint(sd)("a cat", img, mask, steps=4, generator=torch.Generator().manual_seed(0), show_progress=False)
    g = torch.Generator().manual_seed(0)
    torch.randn(1, 4, 8, 8, generator=g)  # the pipeline draws the initial latents first
    known = sd.codec.encode(2 * img - 1, generator=g)
    # the right half of the latents (kept) is exactly the encoded original
    torch.testing.assert_close(out.latents[..., 4:], known[..., 4:])
    assert not torch.allclose(out.latents[..., :4], known[..., :4])


def test_inpaint_with_a_nine_channel_unet(sd_inpaint):
    mask = torch.ones(2, 1, 16, 16)
    out = Inpaint(sd_inpaint)(["a", "b"], image(2), mask, steps=3, show_progress=False)
    assert out.images.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="mask must have shape"):
        Inpaint(sd_inpaint)(["a", "b"], image(2), torch.ones(2, 1, 8, 8), steps=3, show_progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(height=10), "height=10 must be a multiple of 4"),
        (dict(width=0), "width"),
        (dict(steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(sampler="lms"), "sampler='lms'"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), "latents must have shape"),
    ],
)
def test_text_to_image_rejects_bad_input(sd, kwargs, match):
    args = dict(prompt="a cat", height=16, width=16, steps=2, show_progress=False)
    args.update(kwargs)
    prompt = args.pop("prompt")
    with pytest.raises(ConfigError, match=match):
        TextToImage(sd)(prompt, **args)


def test_unconditional_pipeline_round_trip_and_class_guidance(tmp_path, fixtures_dir):
    pipe = load_pipeline(fixtures_dir / "pipelines" / "ddpm_unconditional")
    a = pipe(2, steps=5, sampler="ddim", generator=torch.Generator().manual_seed(0), show_progress=False)
    save_pipeline(pipe, tmp_path / "p")
    b = load_pipeline(tmp_path / "p")(2, steps=5, sampler="ddim", generator=torch.Generator().manual_seed(0),
                                       show_progress=False)  # fmt: skip
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)

    unet = load_unet(fixtures_dir / "models" / "unet2d_class_conditional" / "model")
    classes = UnconditionalPipeline(unet, SamplerConfig(sampler="ddim"))
    kw = dict(steps=3, generator=None, show_progress=False)
    torch.manual_seed(0)
    out = classes(2, class_labels=[0, 1], guidance_scale=3.0, **kw)
    assert out.shape[0] == 2
    with pytest.raises(ConfigError, match="class_labels"):
        classes(2, class_labels=[0, 99], **kw)
    with pytest.raises(ConfigError, match="not class-conditional"):
        pipe(1, steps=2, class_labels=[0], show_progress=False)
