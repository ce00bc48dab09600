"""Inpainting: repaint the masked part of an image to match a prompt.

With an inpainting U-Net (9 input channels) the mask and the encoded masked image enter as extra
channels (``concat``) at every step (Rombach et al. 2022, sec. 4.5). With an ordinary U-Net the known
region is replaced by the noised original at every network call and pasted back at the end (the
"blended" variant, as in RePaint, Lugmayr et al. 2022, without resampling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.diffusion.grids import interpolate_sigma
from diffusekit.errors import ConfigError
from diffusekit.pipelines.common import GeneratorArg, draw
from diffusekit.pipelines.denoise import GenerationResult, denoise, grid_for, sampler_for
from diffusekit.pipelines.img2img import check_image
from diffusekit.pipelines.stable_diffusion import (
    Prompts,
    StableDiffusion,
    encode_prompts,
    latent_shape,
)
from diffusekit.samplers.common import Model, StepInfo
from diffusekit.samplers.config import noised_state


def check_mask(mask: Tensor, image: Tensor) -> Tensor:
    """A (B, 1, H, W) mask matching the image (1 = repaint), binarised at 0.5."""
    b, _, h, w = image.shape
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
        raise ConfigError(f"mask must be a (B, 1, H, W) tensor, got {getattr(mask, 'shape', mask)}")
    if mask.shape[0] != b or mask.shape[2:] != image.shape[2:]:
        raise ConfigError(f"mask must have shape {(b, 1, h, w)} to match the image, got {tuple(mask.shape)}")
    return (mask >= 0.5).to(image.dtype)


class Inpaint:
    """Repaint where ``mask`` is 1, keep where it is 0."""

    def __init__(self, sd: StableDiffusion):
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        image: Tensor,
        mask: Tensor,
        *,
        strength: float = 1.0,
        negative_prompt: Prompts | None = None,
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
        """``image`` (B, 3, H, W) and ``mask`` (B, 1, H, W) in [0, 1]. ``latents`` replaces the noise draw.
        ``guidance_interval`` (lo, hi): guidance only where lo < sigma <= hi, as in
        :class:`~diffusekit.pipelines.text_to_image.TextToImage` (Kynkäänniemi et al. 2024); None: at every
        step."""
        sd = self.sd
        cond = encode_prompts(sd, prompt, negative_prompt, guidance_scale)
        image = check_image(image, sd.latent_multiple).to(sd.device, torch.float32)
        mask = check_mask(mask.to(sd.device, torch.float32), image)
        b, _, h, w = image.shape
        if b != cond.context.shape[0]:
            raise ConfigError(f"got {b} images for {cond.context.shape[0]} prompts")
        shape = latent_shape(sd, b, h, w)
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps, strength)
        gate = config.guidance_gate(guidance_interval)

        if latents is None:
            latents = draw(shape, generator, sd.dtype, sd.device)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(sd.device, sd.dtype)
        mask_latent = F.interpolate(mask, size=shape[2:], mode="nearest").to(sd.dtype)  # (B, 1, h, w)
        in_channels = sd.unet.config.in_channels

        if in_channels == 2 * shape[1] + 1:  # an inpainting U-Net: latents + mask + masked-image latents
            masked = (2 * image - 1) * (mask < 0.5)
            masked_latents = sd.codec.encode(masked, generator=generator).to(sd.dtype)
            model = cond.model(sd.unet, gate=gate, concat=torch.cat([mask_latent, masked_latents], dim=1))
            x = self._start(config, grid, strength, latents, image, generator)
            return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress)
        if in_channels != shape[1]:
            raise ConfigError(f"the U-Net has {in_channels} input channels; inpainting needs {shape[1]} or "
                              f"{2 * shape[1] + 1}")  # fmt: skip
        known = sd.codec.encode(2 * image - 1, generator=generator).to(sd.dtype)
        fixed_noise = draw(shape, generator, sd.dtype, sd.device)
        model = _blended(cond.model(sd.unet, gate=gate), known, fixed_noise, mask_latent, sd)
        x = grid.init_noise_sigma * latents if strength >= 1.0 else noised_state(config, grid, known, latents)

        def finish(z: Tensor) -> Tensor:
            return mask_latent * z + (1 - mask_latent) * known

        return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress, finish)

    def _start(self, config, grid, strength: float, latents: Tensor, image: Tensor, generator) -> Tensor:
        if strength >= 1.0:
            return latents * grid.init_noise_sigma
        init = self.sd.codec.encode(2 * image - 1, generator=generator).to(latents.dtype)
        return noised_state(config, grid, init, latents)


def _blended(model: Model, known: Tensor, noise: Tensor, mask: Tensor, sd: StableDiffusion) -> Model:
    """Before each network call, set the kept region to the original latents noised to the call's level."""
    schedule = sd.sampler_config.schedule()

    def blended(x_t: Tensor, t: Tensor) -> Tensor:
        sigma = interpolate_sigma(schedule, torch.as_tensor(t).double().reshape(1).cpu())[0]
        abar = float(1 / (1 + sigma**2))
        noised = abar**0.5 * known + (1 - abar) ** 0.5 * noise  # DDPM eq. 4
        return model(mask * x_t + (1 - mask) * noised, t)

    return blended
