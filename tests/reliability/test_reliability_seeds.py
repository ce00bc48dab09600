"""Reproducibility: what a seed guarantees (see docs/reliability.md, "Seeds").

* The same seed, settings and machine give bit-identical images: twice in one process and in two processes.
* Each image of a batch made with one generator per image (``generators_from_seeds``) starts from exactly the
  noise it gets alone with its seed: the noise is drawn per image, on the CPU, whatever the batch and device.
  The final images agree to float rounding (batched kernels may sum in another order), not always bit for
  bit; ``diffusekit txt2img`` therefore generates one image per network batch by default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusekit.pipelines.common import draw, generators_from_seeds

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pipelines"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")
BATCH_ATOL = 1e-4  # batch vs alone, images in [0, 1]: measured <= 1.4e-5; one 8-bit level is 3.9e-3

# generates with the tiny pipelines and saves the results: run twice in fresh processes
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from diffusekit.pipelines.common import generators_from_seeds
    from diffusekit.pipelines import loading
    from diffusekit.pipelines.text_to_image import TextToImage
    from diffusekit.pipelines.unconditional import load_pipeline

    fixtures, out = sys.argv[1], sys.argv[2]
    sd = loading.load_pipeline(fixtures + "/stable_diffusion")
    t2i = TextToImage(sd)(["a cat", "a dog"], height=16, width=16, steps=3, sampler="euler_ancestral",
                          generator=generators_from_seeds(5, 2), show_progress=False)
    uncond = load_pipeline(fixtures + "/ddpm_unconditional")(2, steps=3, sampler="ddpm",
                                                             generator=generators_from_seeds(9, 2),
                                                             show_progress=False)
    save_file({"t2i": t2i.images.contiguous(), "uncond": uncond.contiguous()}, out)
    """
)


@pytest.fixture(scope="module")
def sd():
    from diffusekit.pipelines.loading import load_pipeline

    return load_pipeline(FIXTURES / "stable_diffusion")


@pytest.fixture(scope="module")
def uncond():
    from diffusekit.pipelines.unconditional import load_pipeline

    return load_pipeline(FIXTURES / "ddpm_unconditional")


def _t2i(sd, prompts, seeds, sampler="euler_ancestral", **kw):
    from diffusekit.pipelines.text_to_image import TextToImage

    return TextToImage(sd)(prompts, height=16, width=16, steps=3, sampler=sampler, show_progress=False,
                           generator=generators_from_seeds(seeds, len(prompts)), **kw)  # fmt: skip


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddim", "dpmpp_2m", "ddpm"])
def test_same_seed_same_image_in_one_process(sd, sampler):
    a = _t2i(sd, ["a cat", "a dog"], [1, 2], sampler)
    b = _t2i(sd, ["a cat", "a dog"], [1, 2], sampler)
    assert torch.equal(a.images, b.images)
    c = _t2i(sd, ["a cat", "a dog"], [1, 3], sampler)
    assert torch.equal(a.images[0], c.images[0])  # image 0 keeps its seed, whatever its neighbour
    assert not torch.equal(a.images[1], c.images[1])


def test_same_seed_same_image_across_processes(tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.safetensors"
        subprocess.run([sys.executable, "-c", SCRIPT, str(FIXTURES), str(out)], check=True, env=env, timeout=600)
        outs.append(load_file(str(out)))
    for key in ("t2i", "uncond"):
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_batch_noise_equals_the_noise_drawn_alone():
    shape = (3, 4, 8, 8)
    batch = draw(shape, generators_from_seeds([7, 8, 9], 3), torch.float32, torch.device("cpu"))
    for i, seed in enumerate([7, 8, 9]):
        alone = draw((1, *shape[1:]), generators_from_seeds([seed], 1), torch.float32, torch.device("cpu"))
        assert torch.equal(batch[i], alone[0])
    # the device and dtype of the result do not change the numbers drawn (they are drawn on the CPU in float32)
    half = draw(shape, generators_from_seeds([7, 8, 9], 3), torch.float64, torch.device("cpu"))
    assert torch.equal(half.float(), batch)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "ddpm", "ddim"])
def test_each_image_of_a_batch_equals_the_image_made_alone(sd, sampler):
    batch = _t2i(sd, ["a cat", "a dog", "a cow"], [10, 11, 12], sampler)
    for i, (prompt, seed) in enumerate(zip(["a cat", "a dog", "a cow"], [10, 11, 12])):
        alone = _t2i(sd, [prompt], [seed], sampler)
        assert torch.equal(batch.start[i], alone.start[0])  # the same starting noise, exactly
        torch.testing.assert_close(batch.images[i], alone.images[0], rtol=0, atol=BATCH_ATOL)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler_ancestral"])
def test_unconditional_batch_images_equal_the_images_made_alone(uncond, sampler):
    kw = {"steps": 3, "sampler": sampler, "height": 16, "width": 16, "show_progress": False}
    batch = uncond(3, generator=generators_from_seeds(20, 3), **kw)
    again = uncond(3, generator=generators_from_seeds(20, 3), **kw)
    assert torch.equal(batch, again)
    for i in range(3):
        alone = uncond(1, generator=generators_from_seeds(20 + i, 1), **kw)
        torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=BATCH_ATOL)


def test_one_generator_for_the_whole_batch_is_the_reference_order(sd):
    """A single torch.Generator draws the batch's noise in one call (the reference implementation's order):
    reproducible, but image i then depends on the batch size -- which is why the CLI uses one per image."""
    from diffusekit.pipelines.text_to_image import TextToImage

    t2i = TextToImage(sd)
    kw = {"height": 16, "width": 16, "steps": 2, "show_progress": False}
    a = t2i(["a cat", "a dog"], generator=torch.Generator().manual_seed(4), **kw)
    b = t2i(["a cat", "a dog"], generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.images, b.images)
    alone = t2i(["a dog"], generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(a.start[1], alone.start[0])
