"""SDXL text-to-image and image-to-image on the tiny fixture model: loading and its errors, shapes and
determinism, micro-conditioning, the zero negative embedding rule, saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.pipelines.loading import identify, load_pipeline, save_pipeline
from diffusekit.pipelines.sdxl import (
    ImageToImageXL,
    StableDiffusionXL,
    TextToImageXL,
    check_xl_parts,
    micro_conditioning,
)
from diffusekit.pipelines.text_to_image import TextToImage

RUN = dict(height=16, width=16, steps=3, show_progress=False)


@pytest.fixture(scope="module")
def sdxl_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_xl"


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> StableDiffusionXL:
    return load_pipeline(sdxl_dir)


class UNetInputs(torch.nn.Module):
    """Wraps the U-Net and keeps the keyword tensors of each call."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, x, t, **kw):
        self.calls.append({k: v.clone() for k, v in kw.items()})
        return self.unet(x, t, **kw)


def _recorded(sd: StableDiffusionXL, monkeypatch) -> UNetInputs:
    rec = UNetInputs(sd.unet)
    monkeypatch.setattr(sd, "unet", rec)
    return rec


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_folder_loads_as_sdxl(sdxl, sdxl_dir):
    assert identify(sdxl_dir).family == "sdxl"
    assert isinstance(sdxl, StableDiffusionXL)
    assert sdxl.force_zeros_for_empty_prompt is True
    assert sdxl.text_encoder_2.config.projection_dim == 24
    assert sdxl.tokenizer_2.pad_id == 0 and sdxl.tokenizer.pad_id != 0
    assert sdxl.sampler_config.sampler == "euler"
    assert sdxl.default_size() == 16  # unet sample_size 8 x VAE factor 2
    assert sdxl.codec.scaling_factor == pytest.approx(0.13025)


def test_text_to_image_shape_range_and_determinism(sdxl):
    run = TextToImageXL(sdxl)
    a = run(["a cat", "a dog"], generator=_seeded(1), **RUN)
    b = run(["a cat", "a dog"], generator=_seeded(1), **RUN)
    c = run(["a cat", "a dog"], generator=_seeded(2), **RUN)
    assert a.images.shape == (2, 3, 16, 16) and a.latents.shape == (2, 4, 8, 8)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert not torch.allclose(a.images, c.images)
    d = run("a cat", generator=_seeded(1), **{**RUN, "height": None, "width": None})  # the model's own size
    assert d.images.shape == (1, 3, 16, 16)


def test_micro_conditioning_changes_the_output_and_reaches_the_unet(sdxl, monkeypatch):
    rec = _recorded(sdxl, monkeypatch)
    latents = torch.randn(1, 4, 8, 8, generator=_seeded(3))
    run = TextToImageXL(sdxl)
    base = run("a castle", latents=latents, **RUN)
    same = run("a castle", latents=latents, original_size=(16, 16), crops_coords_top_left=(0, 0),
               target_size=(16, 16), **RUN)  # fmt: skip
    cropped = run("a castle", latents=latents, original_size=(40, 24), crops_coords_top_left=(4, 8),
                  target_size=(16, 32), **RUN)  # fmt: skip
    torch.testing.assert_close(base.images, same.images, rtol=0, atol=0)  # the defaults are (H, W), (0, 0), (H, W)
    assert (base.images - cropped.images).abs().max() > 1e-4
    ids = rec.calls[-1]["time_ids"]
    assert ids.tolist() == [[40.0, 24.0, 4.0, 8.0, 16.0, 32.0]] * 2  # negative and positive rows alike
    assert rec.calls[0]["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2


def test_negative_embeddings_are_zeros_only_without_a_negative_prompt(sdxl, monkeypatch):
    """force_zeros_for_empty_prompt: no negative prompt -> zero text states and pooled embedding for the
    unconditional half; an explicit "" is encoded; without the flag "" is encoded for a missing one."""
    rec = _recorded(sdxl, monkeypatch)
    run = TextToImageXL(sdxl)
    run("a castle", generator=_seeded(), **{**RUN, "steps": 1})
    none = rec.calls[-1]
    assert none["context"].shape == (2, 77, 80) and none["pooled"].shape == (2, 24)
    assert torch.count_nonzero(none["context"][0]) == 0 and torch.count_nonzero(none["pooled"][0]) == 0
    assert torch.count_nonzero(none["context"][1]) > 0 and torch.count_nonzero(none["pooled"][1]) > 0
    run("a castle", negative_prompt="", generator=_seeded(), **{**RUN, "steps": 1})
    empty = sdxl.encode([""])
    torch.testing.assert_close(rec.calls[-1]["context"][:1], empty.context)
    torch.testing.assert_close(rec.calls[-1]["pooled"][:1], empty.pooled)
    monkeypatch.setattr(sdxl, "force_zeros_for_empty_prompt", False)
    run("a castle", generator=_seeded(), **{**RUN, "steps": 1})
    torch.testing.assert_close(rec.calls[-1]["context"][:1], empty.context)
    run("a castle", guidance_scale=1.0, generator=_seeded(), **{**RUN, "steps": 1})
    assert rec.calls[-1]["context"].shape[0] == 1  # no guidance: no negative half at all


def test_text_is_both_encoders_penultimate_states_and_the_projected_pooled(sdxl):
    with torch.inference_mode():
        emb = sdxl.encode(["a photo of a cat"])
        h1 = sdxl.text_encoder(sdxl.tokenizer(["a photo of a cat"])).hidden_states[-2]
        out2 = sdxl.text_encoder_2(sdxl.tokenizer_2(["a photo of a cat"]))
    torch.testing.assert_close(emb.context, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(emb.pooled, out2.text_embeds)
    torch.testing.assert_close(sdxl.encode_text(["a photo of a cat"]), emb.context)


def test_image_to_image_keeps_the_image_at_low_strength(sdxl):
    image = torch.rand(1, 3, 16, 16, generator=_seeded(4))
    run = ImageToImageXL(sdxl)
    low = run("a lake", image, strength=0.2, steps=10, generator=_seeded(5), show_progress=False)
    high = run("a lake", image, strength=1.0, steps=10, generator=_seeded(5), show_progress=False)
    again = run("a lake", image, strength=0.2, steps=10, generator=_seeded(5), show_progress=False)
    assert low.images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(low.images, again.images, rtol=0, atol=0)
    init = sdxl.codec.encode(2 * image - 1, generator=_seeded(5))
    # strength 0.2 starts from the encoded image plus a little noise; strength 1 from (almost) pure noise
    assert (low.start - init).abs().mean() < (high.start - init).abs().mean()
    with pytest.raises(ConfigError, match="got 2 images for 1 prompts"):
        run("a lake", torch.cat([image, image]), steps=2, show_progress=False)


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"crops_coords_top_left": (-1, 0)}, r"crops_coords_top_left\[0\]"),
        ({"original_size": (0, 16)}, r"original_size\[0\]"),
        ({"target_size": (16, 1.5)}, r"target_size\[1\]"),
        ({"target_size": (16,)}, "target_size must be a pair"),
    ],
)
def test_micro_conditioning_values_are_checked_by_name(kw, name):
    with pytest.raises(ConfigError, match=name):
        micro_conditioning(16, 16, **kw)


def test_the_sd_pipeline_refuses_to_run_sdxl_silently(sdxl, fixtures_dir):
    """SD's TextToImage gives the U-Net no pooled text / time ids: a clear error, never a wrong image."""
    with pytest.raises(ConfigError, match="pooled is required"):
        TextToImage(sdxl)("a cat", **RUN)
    with pytest.raises(ConfigError, match="needs an SDXL model"):
        TextToImageXL(load_pipeline(fixtures_dir / "pipelines" / "stable_diffusion"))


@pytest.fixture
def xl_copy(sdxl_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "xl"
    shutil.copytree(sdxl_dir, folder)
    return folder


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_a_missing_second_text_encoder_or_tokenizer_is_named(xl_copy, part):
    shutil.rmtree(xl_copy / part)
    with pytest.raises(WeightsError, match=f"{xl_copy}: an SDXL model folder needs {part}/"):
        load_pipeline(xl_copy)


def test_refiner_and_inpainting_folders_are_refused_by_name(xl_copy):
    index = json.loads((xl_copy / "model_index.json").read_text())
    (xl_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline",
                                                          "text_encoder": [None, None],
                                                          "requires_aesthetics_score": True}))  # fmt: skip
    with pytest.raises(WeightsError, match="an SDXL refiner"):
        load_pipeline(xl_copy)
    (xl_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLInpaintPipeline"}))
    with pytest.raises(WeightsError, match="SDXL inpainting model"):
        identify(xl_copy)
    (xl_copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": "yes"}))
    with pytest.raises(ConfigError, match="model_index.json: force_zeros_for_empty_prompt must be true or false"):
        load_pipeline(xl_copy)
    (xl_copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert load_pipeline(xl_copy).force_zeros_for_empty_prompt is False


def test_parts_that_do_not_fit_are_named(sdxl, sdxl_dir):
    pairs = [(sdxl.tokenizer, sdxl.text_encoder), (sdxl.tokenizer_2, sdxl.text_encoder_2)]
    check_xl_parts(sdxl_dir, sdxl.unet, sdxl.codec.vae, pairs)
    with pytest.raises(ConfigError, match="cross_attention_dim=80, text_encoder \\+ text_encoder_2 hidden sizes=64"):
        check_xl_parts(sdxl_dir, sdxl.unet, sdxl.codec.vae, [pairs[0], pairs[0]])  # no projection either
    with pytest.raises(ConfigError, match="text_encoder_2 has no text_projection"):
        check_xl_parts(sdxl_dir, sdxl.unet, sdxl.codec.vae, [pairs[0], pairs[0]])


def test_sdxl_single_files_are_refused_with_a_clear_message(tmp_path, fixtures_dir):
    file = tmp_path / "sd_xl_base.safetensors"
    save_file({"conditioner.embedders.1.model.text_projection": torch.zeros(2, 2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, file)  # fmt: skip
    with pytest.raises(WeightsError, match="an SDXL checkpoint"):
        load_pipeline(file, tokenizer=fixtures_dir / "pipelines" / "stable_diffusion" / "tokenizer")


def test_saved_folder_loads_back_the_same_model(sdxl, tmp_path):
    out = save_pipeline(sdxl, tmp_path / "saved")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    back = load_pipeline(out)
    assert isinstance(back, StableDiffusionXL)
    a = TextToImageXL(sdxl)("a cat", generator=_seeded(6), **RUN)
    b = TextToImageXL(back)("a cat", generator=_seeded(6), **RUN)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
