"""Text-to-image generation with a Stable Diffusion model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.pipelines.common import GeneratorArg, draw
from diffusekit.pipelines.denoise import GenerationResult, denoise, grid_for, sampler_for
from diffusekit.pipelines.stable_diffusion import (
    Prompts,
    StableDiffusion,
    encode_prompts,
    latent_shape,
)
from diffusekit.samplers.common import StepInfo


class TextToImage:
    """prompt -> CLIP context -> sampler loop over the U-Net with classifier-free guidance -> VAE decode."""

    def __init__(self, sd: StableDiffusion):
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        *,
        negative_prompt: Prompts | None = None,
        height: int = 512,
        width: int = 512,
        steps: int = 25,
        guidance_scale: float = 7.5,
        guidance_interval: Sequence[float] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: GeneratorArg = None,
        latents: Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Generate one image per prompt. ``latents`` (B, 4, H/8, W/8) replaces the initial noise draw.
        ``guidance_interval`` (lo, hi) applies the guidance only at noise levels lo < sigma <= hi (Kynkäänniemi
        et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in
        Diffusion Models"; sigma = sqrt((1 - abar) / abar) as in Karras et al. 2022, hi may be inf); the other
        steps evaluate the conditional model alone. None: guidance at every step."""
        sd = self.sd
        cond = encode_prompts(sd, prompt, negative_prompt, guidance_scale)
        shape = latent_shape(sd, cond.context.shape[0], height, width)
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps)
        if latents is None:
            latents = draw(shape, generator, sd.dtype, sd.device)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for {height}x{width}, got {tuple(latents.shape)}")
        x = latents.to(sd.device, sd.dtype) * grid.init_noise_sigma
        model = cond.model(sd.unet, gate=config.guidance_gate(guidance_interval))
        return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress)
