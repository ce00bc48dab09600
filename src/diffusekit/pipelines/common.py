"""What the pipelines share: codecs between pixels and the sampler's space, noise, progress, validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusekit.errors import ConfigError, check_positive_int
from diffusekit.networks.vae import AutoencoderKL, DiagonalGaussian
from diffusekit.samplers.common import Generator as GeneratorArg
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.common import draw_noise as draw  # noqa: F401  (the pipelines' name for it)


class Codec(Protocol):
    """Maps images in [-1, 1] to the space the diffusion model works in, and back."""

    downsample_factor: int
    channels: int

    def encode(self, images: Tensor, noise: Tensor | None = None, generator: GeneratorArg = None) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass
class IdentityCodec:
    """Pixel-space diffusion: the model works on the images themselves."""

    channels: int = 3
    downsample_factor: int = 1

    def encode(self, images: Tensor, noise: Tensor | None = None, generator: GeneratorArg = None) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


@dataclass
class LatentCodec:
    """Latent diffusion (Rombach et al. 2022, sec. 3): a KL autoencoder whose latents are multiplied by
    ``scaling_factor`` (unit variance for the diffusion model, sec. 4.3.2). This is the one place the
    scaling factor is applied.

    ``tile`` (latent pixels) decodes in overlapping tiles to bound memory for large images.
    """

    vae: AutoencoderKL
    tile: int | None = None

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def channels(self) -> int:
        return self.vae.config.latent_channels

    def encode(self, images: Tensor, noise: Tensor | None = None, generator: GeneratorArg = None) -> Tensor:
        """A posterior sample z = mean + std * noise, scaled."""
        posterior = self._encode(images)
        if noise is None:
            noise = draw(posterior.mean.shape, generator, posterior.mean.dtype, posterior.mean.device)
        return posterior.sample(noise=noise) * self.scaling_factor

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The scaled mean and standard deviation of q(z | images): ``mean + std * noise`` is a scaled sample
        (what training caches, so that it can draw a fresh sample each step)."""
        posterior = self._encode(images)
        return posterior.mean * self.scaling_factor, posterior.std * self.scaling_factor

    def _encode(self, images: Tensor) -> DiagonalGaussian:
        return self.vae.encode(images, tile=self.tile * self.downsample_factor if self.tile else None)

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor, tile=self.tile)


def generators_from_seeds(seeds: int | Sequence[int], n: int) -> list[torch.Generator]:
    """One CPU generator per image: ``seeds`` is a list of n seeds, or one seed s meaning s, s+1, ..."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(n)]
    if len(seeds) != n:
        raise ConfigError(f"got {len(seeds)} seeds for {n} images")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] model output -> [0, 1] images, clamped."""
    return (images / 2 + 0.5).clamp(0, 1)


def check_size(height: int, width: int, multiple: int) -> None:
    for name, v in (("height", height), ("width", width)):
        check_positive_int(name, v)
        if v % multiple:
            raise ConfigError(f"{name}={v} must be a multiple of {multiple}")


def progress(total: int, enabled: bool, desc: str) -> Callable[[StepInfo], None] | None:
    """A tqdm bar advanced by the sampler's per-step callback (None when disabled)."""
    if not enabled:
        return None
    bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def step(info: StepInfo) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step


def chain(*callbacks: Callable[[StepInfo], None] | None) -> Callable[[StepInfo], None] | None:
    """One callback that calls each non-None callback in order."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None
    return lambda info: [c(info) for c in active] and None
