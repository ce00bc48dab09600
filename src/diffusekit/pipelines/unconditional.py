"""Unconditional (and class-conditional) image generation with a U-Net in pixel space, or in a VAE's latent
space when the folder has ``vae/``: DDPM, DDIM, ..."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, check_positive_int
from diffusekit.io.models import load_unet, load_vae, save_unet, save_vae
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.io.weights import read_json, write_json
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.common import Codec, GeneratorArg, IdentityCodec, LatentCodec, check_size, draw
from diffusekit.pipelines.denoise import denoise, grid_for, sampler_for
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.guidance import autoguided, guided

GUIDE_LABELS = ("class", "none")  # what an autoguidance guide sees: each image's class, or the "no class" label


class UnconditionalPipeline:
    """Samples images from a U-Net with any sampler: in pixel space, or with a :class:`LatentCodec` in its VAE's
    latent space (the samples are decoded; sizes are in pixels).

    Class-conditional models trained with label dropout use the last class id as the "no class" label,
    which classifier-free guidance needs (``guidance_scale`` > 1).
    """

    def __init__(self, unet: UNet, sampler_config: SamplerConfig, codec: Codec | None = None):
        self.unet = unet
        self.sampler_config = sampler_config
        self.codec = codec if codec is not None else IdentityCodec(channels=unet.config.out_channels)

    @property
    def image_size(self) -> int:
        """The side in pixels of the images the model was trained on (32 when its config does not say)."""
        return (self.unet.config.sample_size or 32) * self.codec.downsample_factor

    @torch.inference_mode()
    def __call__(
        self,
        n: int = 1,
        *,
        steps: int = 50,
        sampler: str | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: GeneratorArg = None,
        class_labels: Sequence[int] | Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: Sequence[float] | None = None,
        guide: UNet | None = None,
        guide_labels: str = "class",
        latents: Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> Tensor:
        """Generate ``n`` images (n, C, H, W) in [0, 1].

        ``sampler`` overrides the configured one by name (ddpm, ddim, euler, euler_ancestral, dpmpp_2m,
        pndm); ``generator`` is a torch.Generator for the whole batch or one per image; ``latents`` gives
        the initial noise explicitly (before scaling by the grid's initial sigma). ``guidance_interval``
        (lo, hi) applies the guidance only at noise levels lo < sigma <= hi (Kynkäänniemi et al. 2024; sigma as in
        Karras et al. 2022), the other steps evaluate the conditional model alone. ``guide``, a weaker version
        of this U-Net (e.g. an earlier EMA of its training run), turns ``guidance_scale`` into autoguidance
        (Karras et al. 2024) instead of classifier-free guidance: class-conditional or not. ``guide_labels``
        (class-conditional models): ``class``, the guide sees each image's class (as in the paper), or ``none``, it
        sees the "no class" label (a guide both earlier and unconditional: on the main job's 1,200-step digits it
        kept more samples in their class, see benchmarks/README.md).
        """
        check_positive_int("n", n)
        config = sampler_for(self.sampler_config, sampler, eta)
        uc, f = self.unet.config, self.codec.downsample_factor
        height, width = height or self.image_size, width or self.image_size
        check_size(height, width, f * 2 ** (uc.levels - 1))
        device, dtype = _device_dtype(self.unet)
        grid = grid_for(config, steps)
        shape = (n, uc.out_channels, height // f, width // f)
        if latents is None:
            latents = draw(shape, generator, dtype, device)
        elif latents.shape != shape:
            raise ConfigError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        gate = config.guidance_gate(guidance_interval)
        model = self._model(n, class_labels, guidance_scale, device, gate, guide, guide_labels)
        x = latents * grid.init_noise_sigma
        return denoise(self.codec, config, model, x, grid, generator, callback, show_progress).images

    def _model(self, n: int, class_labels, guidance_scale: float, device: torch.device, gate=None, guide=None,
               guide_labels: str = "class"):  # fmt: skip
        num_classes = self.unet.config.num_classes
        if guide_labels not in GUIDE_LABELS:
            raise ConfigError(f"guide_labels must be one of {', '.join(GUIDE_LABELS)}, got {guide_labels!r}")
        if guide is not None:
            check_guide(self.unet, guide)
        elif guide_labels != "class":
            raise ConfigError("guide_labels applies to autoguidance only: give a guide model")
        if num_classes is None and guide_labels != "class":
            raise ConfigError("guide_labels 'none' needs a class-conditional model (this one has no classes)")
        if num_classes is None:
            if class_labels is not None:
                raise ConfigError("class_labels given, but this model is not class-conditional")
            if guide is not None:
                return autoguided(self.unet, guide, guidance_scale, {}, gate=gate)
            if guidance_scale != 1.0:
                raise ConfigError("guidance_scale needs a class-conditional model (this one has no classes) or a "
                                  "guide model (autoguidance)")  # fmt: skip
            return self.unet
        if class_labels is None:
            class_labels = torch.full((n,), num_classes - 1)  # the "no class" label
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n or (labels < 0).any() or (labels >= num_classes).any():
            raise ConfigError(f"class_labels must be {n} ids in [0, {num_classes - 1}], got {labels.tolist()}")
        null = torch.full_like(labels, num_classes - 1)
        if guide is not None:
            weak = {"class_labels": null} if guide_labels == "none" else None
            return autoguided(self.unet, guide, guidance_scale, {"class_labels": labels}, guide_cond=weak, gate=gate)
        return guided(self.unet, guidance_scale, {"class_labels": null}, {"class_labels": labels}, gate=gate)


def check_guide(unet: UNet, guide: UNet, where: str = "guide model") -> None:
    """A guiding U-Net must take and make what ``unet`` does: the same channels and the same class table (so
    that its outputs can be mixed with the model's, Karras et al. 2024 eq. 2)."""
    for name in ("in_channels", "out_channels", "num_classes"):
        mine, theirs = getattr(unet.config, name), getattr(guide.config, name)
        if mine != theirs:
            raise ConfigError(f"{where}: {name} is {theirs}, the model's is {mine}; a guide must be a version "
                              "of the same model (e.g. an earlier EMA of its training run)")  # fmt: skip


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def load_pipeline(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", plan: Plan | None = None
) -> UnconditionalPipeline:
    """Load a ``{model_index.json, unet/, scheduler/scheduler_config.json}`` folder (the DDPMPipeline layout),
    with ``vae/`` for a latent model, and apply the runtime ``plan`` to its U-Net (default: float32 inference
    with the machine's fast convolutions, :mod:`diffusekit.runtime.policy`)."""
    folder = Path(folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    config = scheduler_from_diffusers(read_json(sched)) if sched.exists() else SamplerConfig()
    unet = load_unet(folder / "unet", device=device)
    prepare(unet, plan or Plan(dtype=torch.float32), device=device)
    codec = None
    if (folder / "vae").is_dir():
        vae = load_vae(folder / "vae", device=device)
        if vae.config.latent_channels != unet.config.out_channels:
            raise ConfigError(f"{folder}: the U-Net makes {unet.config.out_channels}-channel latents, the VAE "
                              f"decodes {vae.config.latent_channels}-channel ones")  # fmt: skip
        codec = LatentCodec(vae)
    return UnconditionalPipeline(unet, config, codec)


def save_pipeline(pipe: UnconditionalPipeline, folder: str | os.PathLike) -> None:
    """Write the pipeline in the layout ``load_pipeline`` (and the reference) reads."""
    folder = Path(folder)
    save_unet(pipe.unet, folder / "unet")
    scheduler = scheduler_to_diffusers(pipe.sampler_config)
    write_json(scheduler, folder / "scheduler" / "scheduler_config.json")
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", scheduler["_class_name"]],
             "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    if isinstance(pipe.codec, LatentCodec):
        save_vae(pipe.codec.vae, folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    write_json(index, folder / "model_index.json")
