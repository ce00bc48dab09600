"""Pixel-space diffusion super-resolution (SR3, Saharia et al. 2021, "Image Super-Resolution via Iterative
Refinement"): a U-Net trained on high-resolution images whose input is the noisy high-resolution image with the
low-resolution image, upsampled to the target size by bicubic interpolation, stacked on the channels
(``concat``, SR3 sec. 2.4).

Optionally the conditioning image is noised to an integer ``noise_level`` before it is stacked (noise
conditioning augmentation, Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image Generation",
sec. 4.2), and the level enters the network as its class label (``emb``): level 0 is the clean image, level
k >= 1 is DDPM eq. 4 at the model's own training timestep k - 1. A model trained so also upscales slightly
degraded inputs.

The degradation the training data goes through (:func:`downsample`) and the conditioning
(:func:`upsample_condition`, :func:`noise_condition`) are defined here once, for the trainer and this
pipeline both. Sampling is the loop every pipeline runs (:func:`~diffusekit.pipelines.denoise.denoise`) with
any sampler. Inputs whose sides are not multiples of what the U-Net needs are padded (edge pixels repeated)
and the output is cropped back; inputs larger than one pass are denoised in overlapping tiles whose model
outputs are blended at every step, as the Stable Diffusion x4 upscaler does
(:mod:`diffusekit.pipelines.upscale`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.weights import read_json, write_json
from diffusekit.limits import check_int
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.common import GeneratorArg, IdentityCodec, draw
from diffusekit.pipelines.denoise import GenerationResult, denoise, grid_for, sampler_for
from diffusekit.pipelines.unconditional import UnconditionalPipeline, load_pipeline, save_pipeline
from diffusekit.pipelines.upscale import check_noise_level, check_tile, pad_to_multiple, with_image
from diffusekit.runtime.policy import Plan
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import SamplerConfig

SR_PIPELINE_CLASS = "PixelSuperResolutionPipeline"  # model_index.json's _class_name of an exported model
TASK = "super-resolution"
DOWNSAMPLE_MODES = ("bicubic", "area")
MAX_SCALE = 16
# Output pixels above which one untiled pass is refused: the U-Net's self-attention over its lower levels
# grows with the square of the pixel count.
MAX_UNTILED_OUTPUT_PIXELS = 512 * 512


# ------------------------------------------------------------------------------------------ the image math
def downsample(images: Tensor, scale: int, mode: str = "bicubic") -> Tensor:
    """``images`` (B, C, H, W) made ``scale`` times smaller: ``area`` (the mean of each scale x scale block)
    or ``bicubic`` (antialiased, Keys' a = -0.5 kernel widened by the factor, as PIL's resize). H and W must be
    multiples of ``scale``."""
    if mode not in DOWNSAMPLE_MODES:
        raise ConfigError(f"downsample must be one of {', '.join(DOWNSAMPLE_MODES)}, got {mode!r}")
    h, w = images.shape[-2:]
    if h % scale or w % scale:
        raise ConfigError(f"an image of {w}x{h} pixels cannot be made {scale} times smaller (sides not multiples)")
    size = (h // scale, w // scale)
    if mode == "area":
        return F.avg_pool2d(images, scale)
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def upsample_condition(low_res: Tensor, scale: int) -> Tensor:
    """The conditioning image: ``low_res`` (B, C, h, w) in [-1, 1] bicubically upsampled to (B, C, s*h, s*w)
    (SR3 sec. 2.4). Not clamped: the network sees the interpolation's small overshoots at training and at
    sampling alike."""
    h, w = low_res.shape[-2:]
    return F.interpolate(low_res, size=(h * scale, w * scale), mode="bicubic", align_corners=False)


def noise_condition(cond: Tensor, levels: Tensor, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``cond`` (B, C, H, W) noised to the integer ``levels`` (B,): level 0 leaves it clean, level k >= 1 is
    DDPM eq. 4 at timestep k - 1 of ``schedule``, sqrt(abar) cond + sqrt(1 - abar) noise."""
    abar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.double().cpu()])
    a = abar[levels.cpu()].to(cond.device, torch.float32).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * cond + (1 - a).sqrt() * noise


# ------------------------------------------------------------------------------------------ the pipeline
class SuperResolutionPipeline:
    """low-res image -> bicubic x ``scale`` (noised to ``noise_level``) -> sampler loop over the U-Net on
    [x_t, condition] -> the high-resolution image.

    ``unet`` takes 2 C input channels and gives C; its class table, when it has one, holds the conditioning
    noise levels 0..``max_noise_level``. ``downsample`` records how the training inputs were made (the
    consistency error of an evaluation shrinks outputs the same way)."""

    def __init__(
        self,
        unet: UNet,
        sampler_config: SamplerConfig,
        *,
        scale: int,
        max_noise_level: int = 0,
        downsample: str = "bicubic",
    ) -> None:
        uc = unet.config
        check_int("scale", scale, 2, MAX_SCALE)
        if downsample not in DOWNSAMPLE_MODES:
            raise ConfigError(f"downsample must be one of {', '.join(DOWNSAMPLE_MODES)}, got {downsample!r}")
        if uc.in_channels != 2 * uc.out_channels:
            raise ConfigError(f"a super-resolution U-Net takes 2 x {uc.out_channels} input channels (noisy image + "
                              f"condition), this one takes {uc.in_channels}")  # fmt: skip
        table = uc.num_classes
        if (max_noise_level == 0) != (table is None) or (table is not None and table != max_noise_level + 1):
            raise ConfigError(f"max_noise_level={max_noise_level} does not fit the U-Net's class table "
                              f"({table} entries; it must hold levels 0..max_noise_level, or be absent for 0)")
        if max_noise_level >= sampler_config.num_train_timesteps + 1:
            raise ConfigError(f"max_noise_level={max_noise_level} is past the schedule's "
                              f"{sampler_config.num_train_timesteps} timesteps")  # fmt: skip
        self.unet, self.sampler_config = unet, sampler_config
        self.scale, self.max_noise_level, self.downsample = scale, max_noise_level, downsample

    @property
    def channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def input_multiple(self) -> int:
        """Input sides are padded to multiples of this, so that the output's are multiples of the U-Net's
        factor."""
        f = self.unet.config.downsample_factor
        return f // math.gcd(f, self.scale)

    @property
    def train_input_size(self) -> int | None:
        """The low-resolution size the model was trained at (its training crops' side / scale), if known."""
        size = self.unet.config.sample_size
        return None if size is None else size // self.scale

    @torch.inference_mode()
    def __call__(
        self,
        image: Tensor,
        *,
        steps: int = 50,
        sampler: str | None = None,
        eta: float | None = None,
        noise_level: int = 0,
        generator: GeneratorArg = None,
        latents: Tensor | None = None,
        tile: int | None = None,
        tile_overlap: int | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Upscale ``image`` (B, C, h, w) in [0, 1] to (B, C, scale*h, scale*w).

        Draws (from ``generator``, in order): the conditioning noise (B, C, H', W'), then the initial state
        (B, C, H', W'), where H' and W' are scale times h and w padded to ``input_multiple``; ``latents``
        replaces the second draw. ``tile`` (low-res pixels, a multiple of ``input_multiple``) denoises in
        windows of scale * tile output pixels overlapping by scale * ``tile_overlap`` (default tile // 4);
        None runs the whole image at once (up to ``MAX_UNTILED_OUTPUT_PIXELS`` output pixels)."""
        image = self._check_image(image)
        b, c, h, w = image.shape
        s = self.scale
        noise_level = check_noise_level(noise_level, self.max_noise_level)
        if tile is None and h * w * s * s > MAX_UNTILED_OUTPUT_PIXELS:
            raise ConfigError(f"the output would have {h * w * s * s} pixels, more than {MAX_UNTILED_OUTPUT_PIXELS} "
                              f"in one pass would exhaust memory; pass tile (e.g. {self.train_input_size or 32}) to "
                              "upscale it in overlapping tiles")  # fmt: skip
        if tile is not None:
            check_int("tile", tile, 1, math.isqrt(MAX_UNTILED_OUTPUT_PIXELS) // s)
        tile, tile_overlap = check_tile(tile, tile_overlap, self.input_multiple, 0)
        config = sampler_for(self.sampler_config, sampler, eta)
        grid = grid_for(config, steps)
        p = next(self.unet.parameters())
        device, dtype = p.device, p.dtype

        low_res = 2 * pad_to_multiple(image.to(device, torch.float32), self.input_multiple) - 1  # (B, C, h', w')
        cond = upsample_condition(low_res, s)  # (B, C, H', W')
        noise = draw(cond.shape, generator, torch.float32, device)
        levels = torch.full((b,), noise_level, dtype=torch.long, device=device)
        cond = noise_condition(cond, levels, noise, config.schedule()).to(dtype)
        if latents is None:
            latents = draw(cond.shape, generator, dtype, device)
        elif tuple(latents.shape) != tuple(cond.shape):
            raise ConfigError(f"latents must have shape {tuple(cond.shape)} for a {w}x{h} image, got "
                              f"{tuple(latents.shape)}")  # fmt: skip
        x = latents.to(device, dtype) * grid.init_noise_sigma

        labels = levels if self.max_noise_level else None
        unet = self.unet

        def net(x_t: Tensor, t: Tensor, concat: Tensor) -> Tensor:
            return unet(x_t, t, class_labels=labels, concat=concat)  # (B, C, H', W')

        model = with_image(net, cond, None if tile is None else tile * s, None if tile is None else tile_overlap * s)
        result = denoise(IdentityCodec(channels=c), config, model, x, grid, generator, callback, show_progress)
        result.images = result.images[:, :, : h * s, : w * s]  # the padding's share cut off
        return result

    def _check_image(self, image: Tensor) -> Tensor:
        c = self.channels
        if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != c or not image.is_floating_point():
            raise ConfigError(f"image must be a (B, {c}, h, w) float tensor in [0, 1] (this model has {c} "
                              f"channel(s)), got {getattr(image, 'shape', type(image).__name__)}")  # fmt: skip
        if image.shape[0] < 1 or image.shape[2] < 1 or image.shape[3] < 1:
            raise ConfigError(f"image must hold at least one pixel, got {tuple(image.shape)}")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ConfigError("image values must be finite and in [0, 1]")
        return image


# ------------------------------------------------------------------------------------------ the folder
def save_sr_pipeline(pipe: SuperResolutionPipeline, folder: str | os.PathLike) -> None:
    """Write ``pipe`` in the DDPMPipeline layout (``unet/``, ``scheduler/``) with a ``model_index.json`` that
    names the task, its scale, its downsampling and its conditioning noise levels (callers make the folder
    atomic)."""
    folder = Path(folder)
    save_pipeline(UnconditionalPipeline(pipe.unet, pipe.sampler_config), folder)
    index = read_json(folder / "model_index.json")
    index.update(_class_name=SR_PIPELINE_CLASS, task=TASK, scale=pipe.scale, downsample=pipe.downsample,
                 max_noise_level=pipe.max_noise_level)  # fmt: skip
    write_json(index, folder / "model_index.json")


def load_sr_pipeline(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", plan: Plan | None = None
) -> SuperResolutionPipeline:
    """Read what :func:`save_sr_pipeline` writes (float32 inference by default); messages name the folder."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") != SR_PIPELINE_CLASS or index.get("task") != TASK:
        raise WeightsError(f"{folder}: model_index.json does not describe a pixel super-resolution model")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise WeightsError(f"{folder}: the model has no scheduler/scheduler_config.json")
    try:
        for key in ("scale", "max_noise_level"):
            if isinstance(index.get(key), bool) or not isinstance(index.get(key), int):
                raise ConfigError(f"model_index.json: {key} must be an integer, got {str(index.get(key))[:40]!r}")
        base = load_pipeline(folder, device=device, plan=plan)
        return SuperResolutionPipeline(base.unet, base.sampler_config, scale=index["scale"],
                                       max_noise_level=index["max_noise_level"],
                                       downsample=index.get("downsample", "bicubic"))  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None


__all__ = [
    "DOWNSAMPLE_MODES",
    "MAX_SCALE",
    "MAX_UNTILED_OUTPUT_PIXELS",
    "SR_PIPELINE_CLASS",
    "SuperResolutionPipeline",
    "downsample",
    "load_sr_pipeline",
    "noise_condition",
    "save_sr_pipeline",
    "upsample_condition",
]
