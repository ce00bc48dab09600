"""The latent pipeline folder: what the export writes is what our loaders read, and it generates images of the
training size decoded through the VAE."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.models import load_vae, save_vae
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.training.config import DiffusionConfig
from diffusekit.training.export import load_for_sampling
from diffusekit.training.latent_export import export_latent_pipeline, latent_sampler_config
from diffusekit.training.presets import build_unet_config
from diffusekit.training.text_vocab import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
DIFFUSION = DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def vae(sd_folder):
    return load_vae(sd_folder / "vae")


def unet(vae, *, num_classes=None, context_dim=None) -> UNet:
    torch.manual_seed(0)
    config = build_unet_config(
        "latent-tiny",
        {},
        channels=vae.config.latent_channels,
        resolution=8,
        num_classes=num_classes,
        context_dim=context_dim,
    )
    return UNet(config)


def test_class_conditional_export_samples_decoded_images(tmp_path, vae):
    folder = export_latent_pipeline(unet(vae, num_classes=2), vae, DIFFUSION, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and (folder / "vae" / "config.json").is_file()
    pipe = load_for_sampling(folder)
    assert pipe.image_size == 16  # 8x8 latents, f=2
    images = pipe(
        3,
        steps=2,
        class_labels=[0, 1, 2],
        guidance_scale=2.0,
        show_progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    # the latents went through the VAE's decoder: the same latents decoded by hand give the same images
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = pipe(1, steps=1, latents=latents, sampler="ddim", show_progress=False)
    assert got.shape == (1, 3, 16, 16)


def test_txt2img_loader_points_a_class_model_to_sample(tmp_path, vae):
    folder = export_latent_pipeline(unet(vae, num_classes=2), vae, DIFFUSION, tmp_path / "model")
    with pytest.raises(WeightsError, match=r"latents with vae/\), not a text-to-image one.*diffusekit sample"):
        load_pipeline(folder)


def test_scheduler_does_not_clip_latents(tmp_path, vae):
    assert latent_sampler_config(DIFFUSION).clip_sample is None
    folder = export_latent_pipeline(unet(vae), vae, DIFFUSION, tmp_path / "model")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is False and sched["beta_schedule"] == "scaled_linear"
    assert "_diffusekit_clip_eps" not in sched and not latent_sampler_config(DIFFUSION).clip_eps


def test_text_export_loads_in_the_sd_loader(tmp_path, vae):
    tok = train_tokenizer(["a red cat", "a blue dog"] * 2, vocab_size=600)
    te = ClipTextEncoder(
        TextEncoderConfig(
            vocab_size=len(tok.vocab),
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            mlp_size=64,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
    )
    folder = export_latent_pipeline(
        unet(vae, context_dim=32), vae, DIFFUSION, tmp_path / "model", tokenizer=tok, text_encoder=te
    )
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer"}
    sd = load_pipeline(folder)
    assert sd.tokenizer.vocab == tok.vocab
    torch.testing.assert_close(sd.text_encoder.token_embedding.weight, te.token_embedding.weight)
    out = TextToImage(sd)(
        ["a red cat", "a blue dog"],
        height=16,
        width=16,
        steps=2,
        guidance_scale=3.0,
        show_progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (2, 3, 16, 16)


def test_mismatched_vae_refused_at_load(tmp_path, vae):
    folder = export_latent_pipeline(unet(vae), vae, DIFFUSION, tmp_path / "model")
    other = AutoencoderKL(dataclasses.replace(vae.config, latent_channels=3))
    save_vae(other, folder / "vae")
    with pytest.raises(ConfigError, match="4-channel latents, the VAE decodes 3-channel"):
        load_for_sampling(folder)


def test_text_presets_need_a_context_width():
    with pytest.raises(ConfigError, match="no attention layers"):
        build_unet_config("test-tiny", {}, channels=4, resolution=8, num_classes=None, context_dim=32)
    config = build_unet_config("latent-tiny", {}, channels=4, resolution=8, num_classes=None, context_dim=32)
    assert config.cross_attention_dim == 32 and config.needs_context
