"""The one denoising loop every pipeline runs: sampler over a grid, then the codec back to pixels.

Pixel-space models use :class:`~diffusekit.pipelines.common.IdentityCodec`, latent models
:class:`~diffusekit.pipelines.common.LatentCodec`; the loop does not know which. Partial grids implement
SDEdit (Meng et al. 2022) for img2img and inpainting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import ConfigError, check_range
from diffusekit.pipelines.common import Codec, GeneratorArg, chain, progress, to_unit_range
from diffusekit.runtime.memory import release_freed_memory
from diffusekit.samplers.common import Model, StepInfo
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler


@dataclass
class GenerationResult:
    """Images (B, C, H, W) in [0, 1], the final state of the sampler (latents, or pixels in [-1, 1] for a
    pixel-space model), and the sampler's starting state."""

    images: Tensor
    latents: Tensor
    start: Tensor


def sampler_for(base: SamplerConfig, sampler: str | None, eta: float | None) -> SamplerConfig:
    """The model's noise schedule ``base`` with the sampler (and ``eta``) the caller asked for."""
    changes = {"eta": eta} if eta is not None else {}
    return base.with_sampler(sampler or base.sampler, **changes) if (sampler or changes) else base


def grid_for(config: SamplerConfig, steps: int, strength: float = 1.0) -> Grid:
    """The grid of ``steps`` steps, or with ``strength`` < 1 its last int(steps * strength) steps (SDEdit,
    Meng et al. 2022: start part way down the noise levels). The full grid is built first, so every
    step lands where it would in a full run."""
    full = build_grid(config, steps)
    if strength == 1.0:
        return full
    strength = check_range("strength", strength, 0.0, 1.0)
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ConfigError(f"strength={strength} with steps={steps} runs no step; raise strength or steps")
    return full[steps - n :]


def denoise(
    codec: Codec,
    config: SamplerConfig,
    model: Model,
    x: Tensor,
    grid: Grid,
    generator: GeneratorArg,
    callback: Callable[[StepInfo], None] | None,
    show_progress: bool,
    finish: Callable[[Tensor], Tensor] | None = None,
) -> GenerationResult:
    """Run the sampler from state ``x`` along ``grid``, apply ``finish`` (e.g. inpainting's final blend) to
    the result, and decode it with ``codec``."""
    bar = progress(len(grid), show_progress, f"denoising ({config.sampler})")
    latents = run_sampler(config, model, x, grid, generator=generator, callback=chain(callback, bar))
    if finish is not None:
        latents = finish(latents)
    # the network's freed activations, kept by the C heap, would otherwise sit under the decoder's peak
    release_freed_memory()
    images = codec.decode(latents.float())
    return GenerationResult(to_unit_range(images.float()), latents, x)
