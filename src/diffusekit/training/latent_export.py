"""The inference folder of a latent diffusion run: a complete diffusers-layout pipeline folder, written
atomically from the EMA weights, in the layouts our loaders read.

- captions (text-conditioned U-Net): the Stable Diffusion layout that ``diffusekit txt2img`` loads
  (``pipelines.loading.load_pipeline``): ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/`` (``vocab.json`` + ``merges.txt``), ``scheduler/``;
- class labels or none: the DDPMPipeline layout with ``vae/`` beside ``unet/`` and ``scheduler/``, which
  ``diffusekit sample`` loads (``pipelines.unconditional.load_pipeline`` decodes through the VAE).

The scheduler is the training schedule with x0 left unclipped (``sampler_config``'s [-1, 1] clip is for pixels;
scaled latents have unit variance and go beyond it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch

from diffusekit.io.atomic import folder_atomic
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import LatentCodec
from diffusekit.pipelines.loading import save_pipeline as save_sd_pipeline
from diffusekit.pipelines.stable_diffusion import StableDiffusion, check_parts
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.pipelines.unconditional import save_pipeline as save_unconditional
from diffusekit.samplers.config import SamplerConfig
from diffusekit.training.config import DiffusionConfig
from diffusekit.training.export import sampler_config


def latent_sampler_config(diffusion: DiffusionConfig, sampler: str | None = None) -> SamplerConfig:
    """The training schedule as a sampler config (``training.export.sampler_config``) without the x0 clip."""
    return dataclasses.replace(sampler_config(diffusion, sampler), clip_sample=None, clip_eps=False)


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode (the given module stays as it is, on its device)."""
    return copy.deepcopy(module).float().cpu().eval()


def export_latent_pipeline(
    unet: UNet,
    vae: AutoencoderKL,
    diffusion: DiffusionConfig,
    folder: str | os.PathLike,
    *,
    tokenizer: ClipTokenizer | None = None,
    text_encoder: ClipTextEncoder | None = None,
) -> Path:
    """Write the pipeline folder (see the module docstring): with ``tokenizer`` and ``text_encoder`` the Stable
    Diffusion layout, else the DDPMPipeline layout with ``vae/``. Replaces ``folder`` atomically."""
    folder = Path(folder)
    codec = LatentCodec(_cpu_copy(vae))
    config = latent_sampler_config(diffusion)
    net = _cpu_copy(unet)
    if text_encoder is not None and tokenizer is not None:
        sd = StableDiffusion(
            unet=net,
            codec=codec,
            tokenizer=tokenizer,
            text_encoder=_cpu_copy(text_encoder),
            sampler_config=config,
            name=folder.name,
        )
        check_parts(folder, sd.unet, sd.codec.vae, sd.tokenizer, sd.text_encoder)
        return save_sd_pipeline(sd, folder)
    with folder_atomic(folder, what="inference folder") as tmp:
        save_unconditional(UnconditionalPipeline(net, config, codec), tmp)
    return folder


__all__ = ["export_latent_pipeline", "latent_sampler_config"]
