"""Stable Diffusion components and the helpers every text-conditioned pipeline shares.

Latent diffusion (Rombach et al. 2022): a KL autoencoder (the codec), a CLIP text encoder whose last hidden
state is the cross-attention ``context``, and a conditional U-Net. The pipelines in ``text_to_image``,
``img2img`` and ``inpaint`` are explicit loops over these parts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, check_range
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import LatentCodec, check_size
from diffusekit.runtime.policy import Plan, autoencoder_plan, prepare
from diffusekit.samplers.common import Model
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.guidance import Gate, guided

Prompts = str | Sequence[str]


@dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion 1.x/2.x model."""

    unet: UNet
    codec: LatentCodec
    tokenizer: ClipTokenizer
    text_encoder: ClipTextEncoder
    sampler_config: SamplerConfig
    name: str = "stable-diffusion"

    def prepare(self, plan: Plan | None = None) -> StableDiffusion:
        """Apply a runtime plan for inference (default: the machine's; keeps each component's dtype) to the
        U-Net and text encoder, and the same layout to the VAE, which stays float32. Returns self. Called by
        the loader (``load_pipeline(..., fast=True)``), never on construction: eval mode, no parameter gradients,
        channels-last weights and, for half precision on a CPU without native bfloat16, float32 compute
        (:mod:`diffusekit.runtime.policy`)."""
        plan = plan or Plan()
        prepare(self.unet, dataclasses.replace(plan, dtype=plan.dtype or self.dtype))
        prepare(self.text_encoder, dataclasses.replace(plan, dtype=plan.dtype or self.dtype))
        prepare(self.codec.vae, autoencoder_plan(plan, self.device))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x U-Net downsampling)."""
        return self.codec.downsample_factor * 2 ** (self.unet.config.levels - 1)

    def encode_text(self, prompts: list[str]) -> Tensor:
        """CLIP last hidden states (B, 77, D) for ``prompts``: the cross-attention context."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)


def check_parts(
    where: str | os.PathLike, unet: UNet, vae: AutoencoderKL, tokenizer: ClipTokenizer, text_encoder: ClipTextEncoder,
    *, image_channels: int = 0,
) -> None:  # fmt: skip
    """Raise ConfigError naming ``where`` when the parts of a model do not fit together (each may be valid on
    its own): the U-Net's cross-attention width against the text encoder's, its channels against the VAE's
    latents (or, for inpainting, latents + mask + masked latents; with ``image_channels``, latents + an image
    of that many channels, as the x4 upscaler), the tokenizer's ids and length against the text encoder's
    vocabulary and positions."""
    u, t = unet.config, text_encoder.config
    latent = vae.config.latent_channels
    problems = []
    if u.cross_attention_dim != t.hidden_size:
        problems.append(f"unet cross_attention_dim={u.cross_attention_dim}, text_encoder hidden_size={t.hidden_size}")
    if u.out_channels != latent:
        problems.append(f"unet out_channels={u.out_channels}, vae latent_channels={latent}")
    if image_channels and u.in_channels != latent + image_channels:
        problems.append(f"unet in_channels={u.in_channels}, expected {latent + image_channels} (latents + image)")
    elif not image_channels and u.in_channels not in (latent, 2 * latent + 1):
        problems.append(f"unet in_channels={u.in_channels}, allowed: {latent} or {2 * latent + 1} (inpainting)")
    top_id = max(tokenizer.vocab.values(), default=0)
    if top_id >= t.vocab_size:
        problems.append(f"tokenizer ids reach {top_id}, text_encoder vocab_size={t.vocab_size}")
    if tokenizer.model_max_length > t.max_positions:
        problems.append(
            f"tokenizer model_max_length={tokenizer.model_max_length}, "
            f"text_encoder max_position_embeddings={t.max_positions}"
        )
    if problems:
        raise ConfigError(f"{where}: the model's components do not fit together: " + "; ".join(problems))


def as_prompt_list(prompt: Prompts, name: str = "prompt", batch: int | None = None) -> list[str]:
    """A list of prompt strings; one string is repeated to ``batch`` items."""
    if isinstance(prompt, str):
        prompts = [prompt] * (batch or 1)
    elif isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise ConfigError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    if batch is not None and len(prompts) != batch:
        raise ConfigError(f"{name} has {len(prompts)} entries but the batch has {batch} prompts")
    return prompts


@dataclass
class Conditioning:
    """Encoded prompts: ``context`` (B, 77, D) and, with guidance, ``negative_context``."""

    context: Tensor
    negative_context: Tensor | None
    guidance_scale: float

    def model(self, unet: UNet, *, gate: Gate | None = None, **extra: Tensor) -> Model:
        """The U-Net as a model(x, t) with classifier-free guidance over [negative; positive]; where ``gate``
        (:func:`~diffusekit.samplers.guidance.interval_gate`) says no, the positive half alone (guidance limited
        to an interval of noise levels, Kynkäänniemi et al. 2024)."""
        cond = {"context": self.context, **extra}
        if self.negative_context is None:
            return guided(unet, 1.0, {}, cond)
        return guided(unet, self.guidance_scale, {"context": self.negative_context, **extra}, cond, gate=gate)


def encode_prompts(
    sd: StableDiffusion, prompt: Prompts, negative_prompt: Prompts | None, guidance_scale: float
) -> Conditioning:
    """Encode prompts (and, when ``guidance_scale`` != 1, negative prompts; "" where none is given)."""
    check_range("guidance_scale", guidance_scale, 0.0, 1e4)
    prompts = as_prompt_list(prompt)
    context = sd.encode_text(prompts)
    if guidance_scale == 1.0:
        return Conditioning(context, None, guidance_scale)
    negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt", len(prompts))
    return Conditioning(context, sd.encode_text(negatives), guidance_scale)


def latent_shape(sd: StableDiffusion, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    check_size(height, width, sd.latent_multiple)
    f = sd.codec.downsample_factor
    return (batch, sd.codec.channels, height // f, width // f)
