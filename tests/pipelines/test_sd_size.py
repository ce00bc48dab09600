"""Size checks at real Stable Diffusion 1.5 sizes on the CPU (slow; run by hand: ``pytest -m slow -s
tests/pipelines/test_sd_size.py``). Random weights: these check memory, time and shapes, not image quality."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.single_file import SD1_SCHEDULER, to_single_file_state_dict
from diffusekit.io.text import load_tokenizer
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS, ClipTextEncoder
from diffusekit.networks.unet import UNET_PRESETS, UNet
from diffusekit.networks.vae import VAE_PRESETS, AutoencoderKL
from diffusekit.pipelines.common import LatentCodec
from diffusekit.pipelines.loading import load_pipeline, parts_of
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.text_to_image import TextToImage

MEMORY_LIMIT_GB = 24.0

pytestmark = pytest.mark.slow


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sd15_sized(tokenizer_folder: Path) -> StableDiffusion:
    """SD-1.5's U-Net (~860M parameters), VAE (~84M) and CLIP ViT-L/14 text encoder (~123M), random weights."""
    torch.manual_seed(0)
    return StableDiffusion(
        unet=UNet(UNET_PRESETS["sd15"]).eval(),
        codec=LatentCodec(AutoencoderKL(VAE_PRESETS["sd"]).eval()),
        tokenizer=load_tokenizer(tokenizer_folder),
        text_encoder=ClipTextEncoder(TEXT_ENCODER_PRESETS["sd1"]).eval(),
        sampler_config=scheduler_from_diffusers(SD1_SCHEDULER),
    ).prepare()  # the runtime plan load_pipeline applies


def test_sd15_sized_model_makes_a_512px_image_on_the_cpu(fixtures_dir):
    start = time.perf_counter()
    sd = sd15_sized(fixtures_dir / "clip_tokenizer_real")
    built = time.perf_counter()
    params = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", sd.unet), ("vae", sd.codec.vae), ("text", sd.text_encoder))}  # fmt: skip
    result = TextToImage(sd)(
        "a photograph of an astronaut riding a horse",
        height=512,
        width=512,
        steps=2,
        guidance_scale=7.5,
        sampler="ddim",
        generator=torch.Generator().manual_seed(0),
    )
    done = time.perf_counter()
    peak = peak_rss_gb()
    print(
        f"\nSD-1.5 sizes ({', '.join(f'{k} {v / 1e6:.0f}M' for k, v in params.items())} parameters), 512x512, "
        f"2 DDIM steps with guidance on {torch.get_num_threads()} threads: build {built - start:.1f} s, "
        f"generate {done - built:.1f} s, peak RSS {peak:.2f} GB"
    )
    assert 850e6 < params["unet"] < 870e6
    assert result.images.shape == (1, 3, 512, 512) and result.latents.shape == (1, 4, 64, 64)
    assert torch.isfinite(result.images).all()
    assert peak < MEMORY_LIMIT_GB


def test_sd15_sized_single_file_loads_with_inferred_configs(fixtures_dir, tmp_path):
    """A float16 SD-1.5-sized single file without our metadata (as real files come) loads into the presets."""
    tokenizer = fixtures_dir / "clip_tokenizer_real"
    sd = sd15_sized(tokenizer)
    path = tmp_path / "sd15-random.safetensors"
    save_file(to_single_file_state_dict(parts_of(sd), torch.float16), str(path))
    del sd
    start = time.perf_counter()
    loaded = load_pipeline(path, tokenizer=tokenizer)
    took = time.perf_counter() - start
    print(f"\nloaded a {path.stat().st_size / 2**30:.2f} GiB single file in {took:.1f} s; "
          f"peak RSS so far {peak_rss_gb():.2f} GB")  # fmt: skip
    assert loaded.unet.config == UNET_PRESETS["sd15"]
    assert loaded.codec.vae.config == VAE_PRESETS["sd"]
    assert loaded.text_encoder.config == TEXT_ENCODER_PRESETS["sd1"]
    assert loaded.dtype == torch.float32
    assert peak_rss_gb() < MEMORY_LIMIT_GB
