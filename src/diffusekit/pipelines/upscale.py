"""The Stable Diffusion x4 upscaler: a latent diffusion model conditioned on a noised low-resolution image.

The U-Net sees the noisy latents with the low-resolution image stacked on the channels (``concat``), the
image first noised to ``noise_level`` by its own DDPM schedule (noise conditioning augmentation, Ho et al.
2022, "Cascaded Diffusion Models for High Fidelity Image Generation", sec. 4.2), and ``noise_level`` enters
as the U-Net's class label (``emb``). The latents have the low-resolution size; the VAE decoder upsamples
them by its factor (4), so the output is that many times larger. The loop is the one every pipeline runs
(:func:`~diffusekit.pipelines.denoise.denoise`), with classifier-free guidance over [negative; positive].

Inputs whose sides are not multiples of the U-Net's factor are padded (edge pixels repeated) and the
output is cropped back. Inputs too large for one pass are denoised in overlapping tiles whose model outputs
are blended at every step (MultiDiffusion, Bar-Tal et al. 2023, eq. 5, with linear-ramp weights), so the
noise, the sampler and the decoded image stay those of one image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.limits import check_int
from diffusekit.networks.vae import tiled_map
from diffusekit.pipelines.common import GeneratorArg, LatentCodec, draw
from diffusekit.pipelines.denoise import GenerationResult, denoise, grid_for, sampler_for
from diffusekit.pipelines.img2img import check_image
from diffusekit.pipelines.stable_diffusion import Prompts, StableDiffusion, encode_prompts
from diffusekit.samplers.common import Model, StepInfo
from diffusekit.samplers.config import SamplerConfig

DEFAULT_NOISE_LEVEL = 20  # the reference pipeline's default
# Low-resolution pixels above which one untiled pass is refused: the U-Net's attention over the latents
# of a 1024x1024 input (4096x4096 output) needs tens of GiB.
MAX_UNTILED_PIXELS = 512 * 512
MAX_TILE = 512  # a tile is one pass: at most MAX_UNTILED_PIXELS


@dataclass(kw_only=True)
class StableDiffusionUpscaler(StableDiffusion):
    """The parts of a Stable Diffusion x4 upscaler: those of :class:`StableDiffusion` (a U-Net with
    ``latent + 3`` input channels and a class table of ``max_noise_level + 1`` noise levels; a VAE whose
    factor is the upscaling factor and which carries its own scaling factor), plus the schedule that noises
    the low-resolution image (``low_res_config``) and the largest noise level the model was trained with."""

    low_res_config: SamplerConfig = field(default_factory=SamplerConfig)
    max_noise_level: int = 350

    def __post_init__(self) -> None:
        check_int("max_noise_level", self.max_noise_level, 0, self.low_res_config.num_train_timesteps - 1)

    @property
    def scale(self) -> int:
        """How many times larger the output is than the input (the VAE's factor)."""
        return self.codec.downsample_factor

    @property
    def input_multiple(self) -> int:
        """Input sides are padded to multiples of this (the U-Net's downsampling; latents have the input's
        size)."""
        return self.unet.config.downsample_factor


def check_noise_level(noise_level: object, max_noise_level: int) -> int:
    """``noise_level`` if it is an integer in [0, max_noise_level]; else a ConfigError naming it."""
    if isinstance(noise_level, bool) or not isinstance(noise_level, int):
        raise ConfigError(f"noise_level must be an integer in [0, {max_noise_level}], got {noise_level!r}")
    if not 0 <= noise_level <= max_noise_level:
        raise ConfigError(
            f"noise_level must be in [0, {max_noise_level}] for this model (its max_noise_level), got {noise_level}"
        )
    return noise_level


def pad_to_multiple(image: Tensor, multiple: int) -> Tensor:
    """``image`` (B, C, H, W) padded at the bottom and right, repeating the edge pixels, to sides that are
    multiples of ``multiple``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return image
    return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")


class Upscale:
    """low-res image -> noised by ``noise_level`` -> sampler loop over the U-Net (latents + image, guided)
    -> VAE decode at ``scale`` times the size."""

    def __init__(self, sd: StableDiffusionUpscaler):
        if not isinstance(sd, StableDiffusionUpscaler):
            raise ConfigError(f"Upscale needs an x4 upscaler model, got {type(sd).__name__}")
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        image: Tensor,
        *,
        negative_prompt: Prompts | None = None,
        noise_level: int = DEFAULT_NOISE_LEVEL,
        steps: int = 75,
        guidance_scale: float = 9.0,
        sampler: str | None = None,
        eta: float | None = None,
        generator: GeneratorArg = None,
        latents: Tensor | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Upscale ``image`` (B, 3, h, w) in [0, 1] to (B, 3, scale*h, scale*w), one prompt per image.

        Draws (from ``generator``, in order): the low-resolution image noise (B, 3, h', w'), then the
        initial latents (B, 4, h', w'), where h' and w' are h and w padded to the U-Net's multiple;
        ``latents`` replaces the second draw. ``tile`` (low-res pixels, a multiple of the U-Net's factor)
        denoises in tiles overlapping by ``tile_overlap`` (default tile // 4) and decodes in tiles too;
        None processes the whole image at once (up to ``MAX_UNTILED_PIXELS``)."""
        sd = self.sd
        cond = encode_prompts(sd, prompt, negative_prompt, guidance_scale)
        image = check_image(image, 1)
        b, _, h, w = image.shape
        if b != cond.context.shape[0]:
            raise ConfigError(f"got {b} images for {cond.context.shape[0]} prompts")
        noise_level = check_noise_level(noise_level, sd.max_noise_level)
        tile, tile_overlap = check_tile(tile, tile_overlap, sd.input_multiple, h * w)
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps)

        low_res = 2 * pad_to_multiple(image.to(sd.device, torch.float32), sd.input_multiple) - 1  # (B, 3, h', w')
        noise = draw(low_res.shape, generator, torch.float32, sd.device)
        level = torch.full((b,), noise_level, dtype=torch.long, device=sd.device)
        image_noised = sd.low_res_config.schedule().add_noise(low_res, noise, level).to(sd.dtype)  # DDPM eq. 4
        shape = (b, sd.codec.channels, *low_res.shape[2:])
        if latents is None:
            latents = draw(shape, generator, sd.dtype, sd.device)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for a {w}x{h} image, got {tuple(latents.shape)}")
        x = latents.to(sd.device, sd.dtype) * grid.init_noise_sigma

        model = with_image(cond.model(sd.unet, class_labels=level), image_noised, tile, tile_overlap)
        codec = sd.codec if tile is None else LatentCodec(sd.codec.vae, tile=tile)
        result = denoise(codec, config, model, x, grid, generator, callback, show_progress)
        f = sd.scale
        result.images = result.images[:, :, : h * f, : w * f]  # the padding's share cut off
        return result


def check_tile(tile: int | None, overlap: int | None, multiple: int, pixels: int) -> tuple[int | None, int | None]:
    """Validated tile size and overlap (None, None: untiled, refused for more than MAX_UNTILED_PIXELS)."""
    if tile is None:
        if overlap is not None:
            raise ConfigError("tile_overlap needs tile")
        if pixels > MAX_UNTILED_PIXELS:
            raise ConfigError(
                f"the image has {pixels} pixels, more than {MAX_UNTILED_PIXELS} in one pass would exhaust memory; "
                f"pass tile (e.g. 128) to upscale it in overlapping tiles"
            )
        return None, None
    check_int("tile", tile, multiple, MAX_TILE)
    if tile % multiple:
        raise ConfigError(f"tile must be a multiple of {multiple} (the U-Net's factor), got {tile}")
    if overlap is None:
        overlap = tile // 4 // multiple * multiple
    check_int("tile_overlap", overlap, 0, tile - multiple)
    if overlap % multiple:
        raise ConfigError(f"tile_overlap must be a multiple of {multiple} (the U-Net's factor), got {overlap}")
    return tile, overlap


def with_image(model: Model, image: Tensor, tile: int | None, overlap: int | None) -> Model:
    """The model of latents alone: ``image`` stacked on as ``concat``; with ``tile``, evaluated on
    overlapping windows of latents and image whose outputs are blended (MultiDiffusion, Bar-Tal et al. 2023,
    eq. 5: each position gets the weighted mean of the windows covering it)."""
    if tile is None:
        return lambda x, t: model(x, t, concat=image)

    def tiled(x: Tensor, t: Tensor) -> Tensor:
        c = x.shape[1]
        both = torch.cat([x, image], dim=1)  # (B, C + 3, h, w): windows of both are cut together
        return tiled_map(lambda win: model(win[:, :c], t, concat=win[:, c:]), both, tile=tile, overlap=overlap)

    return tiled


__all__ = [
    "DEFAULT_NOISE_LEVEL",
    "MAX_TILE",
    "MAX_UNTILED_PIXELS",
    "StableDiffusionUpscaler",
    "Upscale",
    "check_noise_level",
    "check_tile",
    "pad_to_multiple",
    "with_image",
]
