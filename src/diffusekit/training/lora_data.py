"""The data of LoRA fine-tuning: a captioned image folder, encoded once by the pipeline's frozen VAE.

Images are read by :class:`~diffusekit.training.data.ImageFolderDataset` (resized so the shorter side is the
training resolution, then centre-cropped), captions by :mod:`diffusekit.training.captions` (``image.txt`` beside
``image.png``, else the default caption), latents cached by :mod:`diffusekit.training.latent_cache` in the run
folder (keyed by the VAE's fingerprint and the data; flips encoded in pixel space). For SDXL each image's
micro-conditioning (Podell et al. 2023, sec. 2.2) is recorded: its original size, the crop's top-left corner in
the resized image, and the training size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.pipelines.sdxl import StableDiffusionXL, micro_conditioning
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.training.captions import keep_images, read_captions
from diffusekit.training.data import ImageFolderDataset
from diffusekit.training.latent_cache import LATENTS_NAME, LatentCache, load_or_build, vae_fingerprint
from diffusekit.training.lora_config import LoraDataConfig

_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class CaptionedLatents:
    """What training reads: the latent cache, one caption per image, and (SDXL) the ``time_ids`` (N, 6)."""

    cache: LatentCache
    captions: list[str]
    time_ids: Tensor | None
    files: list[Path]
    resolution: int
    captions_from_files: int

    def __len__(self) -> int:
        return len(self.captions)


def default_resolution(sd: StableDiffusion) -> int:
    """The side the model was trained at: SDXL's :meth:`~StableDiffusionXL.default_size`; else the U-Net's
    ``sample_size`` x the VAE factor (512 when the config does not say)."""
    if isinstance(sd, StableDiffusionXL):
        return sd.default_size()
    size = sd.unet.config.sample_size
    return 512 if size is None else size * sd.codec.downsample_factor


def check_resolution(sd: StableDiffusion, resolution: int, option: str = "data.resolution") -> int:
    """``resolution`` if it is a multiple of the model's latent multiple; ConfigError naming ``option``."""
    m = sd.latent_multiple
    if resolution % m:
        low = max(m, resolution // m * m)
        raise ConfigError(f"{option} must be a multiple of {m} for this model (VAE factor x U-Net levels), got "
                          f"{resolution}; try {low} or {low + m}")  # fmt: skip
    return resolution


def crop_corner(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(top, left) of the centre crop that :func:`~diffusekit.training.data.resize_center_crop` takes from an
    image of ``size`` (width, height) resized so its shorter side is ``resolution``."""
    w, h = size
    if (w, h) == (resolution, resolution):
        return 0, 0
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    return (nh - resolution) // 2, (nw - resolution) // 2


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF orientation applied), from its header."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION)
    return (h, w) if orientation in _ROTATED else (w, h)


def sdxl_time_ids(files: list[Path], resolution: int) -> Tensor:
    """SDXL's micro-conditioning (N, 6) of each training image: original (height, width), the crop's (top,
    left), the target (resolution, resolution). A horizontal flip keeps the centre crop's corner (it is
    symmetric to within one pixel), so flipped latents share their image's row."""
    rows = []
    for path in files:
        w, h = upright_size(path)
        rows.append(micro_conditioning(resolution, resolution, (h, w), crop_corner((w, h), resolution)))
    return torch.stack(rows)


def prepare_data(
    sd: StableDiffusion,
    data: LoraDataConfig,
    *,
    model_path: str | os.PathLike,
    run_dir: Path,
    build: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> CaptionedLatents:
    """Read the folder and its captions, and load (or, with ``build``, encode and write) the latent cache at
    ``run_dir / latents.safetensors``. ConfigError for: a source that is not a folder, no images, a resolution
    the model cannot take, images without captions and no default caption, caption files that are not UTF-8
    (named; left out with ``skip_bad_images``)."""
    source = Path(data.source).expanduser()
    if not source.is_dir():
        raise ConfigError(f"data.source {source}: {'not a folder' if source.exists() else 'not found'}; give a "
                          "folder of images (with a caption .txt beside each, or one --caption for all)")  # fmt: skip
    resolution = check_resolution(sd, data.resolution or default_resolution(sd))
    vae = sd.codec.vae
    dataset = ImageFolderDataset(source, resolution=resolution, channels=vae.config.in_channels,
                                 skip_bad=data.skip_bad_images)  # fmt: skip
    captions = read_captions(dataset.files, default=data.caption, skip_bad=data.skip_bad_images)
    dataset = keep_images(dataset, captions.kept)
    cache = load_or_build(
        run_dir / LATENTS_NAME,
        vae,
        dataset,
        vae_key=vae_fingerprint(model_path),
        flips=data.random_flip,
        rebuild=build,
        device=device,
        progress=progress,
    )
    time_ids = sdxl_time_ids(dataset.files, resolution) if isinstance(sd, StableDiffusionXL) else None
    return CaptionedLatents(cache, captions.texts, time_ids, list(dataset.files), resolution, captions.from_files)


__all__ = [
    "CaptionedLatents",
    "check_resolution",
    "crop_corner",
    "default_resolution",
    "prepare_data",
    "sdxl_time_ids",
    "upright_size",
]
