"""Image-to-image (SDEdit, Meng et al. 2022): noise an encoded image part way, then denoise it."""

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
)
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import noised_state


def check_image(image: Tensor, multiple: int, name: str = "image") -> Tensor:
    """Images (B, 3, H, W) in [0, 1] with H and W multiples of ``multiple``."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        raise ConfigError(f"{name} must be a (B, 3, H, W) tensor in [0, 1], got {getattr(image, 'shape', image)}")
    if image.shape[2] % multiple or image.shape[3] % multiple:
        raise ConfigError(f"{name} height and width must be multiples of {multiple}, got {tuple(image.shape[2:])}")
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise ConfigError(f"{name} values must be finite and in [0, 1]")
    return image


class ImageToImage:
    """Encode the image, add noise to the level of the first step kept, denoise with guidance, decode."""

    def __init__(self, sd: StableDiffusion):
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        image: Tensor,
        *,
        strength: float = 0.8,
        negative_prompt: Prompts | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        guidance_interval: Sequence[float] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: GeneratorArg = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """``image`` (B, 3, H, W) in [0, 1]; ``strength`` in (0, 1]: 1 ignores the image's content.
        ``guidance_interval`` (lo, hi): guidance only where lo < sigma <= hi, as in :class:`TextToImage`
        (Kynkäänniemi et al. 2024); None: at every step."""
        sd = self.sd
        cond = encode_prompts(sd, prompt, negative_prompt, guidance_scale)
        image = check_image(image, sd.latent_multiple)
        if image.shape[0] != cond.context.shape[0]:
            raise ConfigError(f"got {image.shape[0]} images for {cond.context.shape[0]} prompts")
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps, strength)
        init = sd.codec.encode(2 * image.to(sd.device, torch.float32) - 1, generator=generator).to(sd.dtype)
        noise = draw(init.shape, generator, init.dtype, init.device)
        x = noised_state(config, grid, init, noise)
        model = cond.model(sd.unet, gate=config.guidance_gate(guidance_interval))
        return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress)
