"""The configuration of autoencoder training (``diffusekit train-vae``): the sections ``data``, ``optim``,
``ema`` and ``run`` of ``diffusekit.training.config`` (with defaults suited to an autoencoder) plus ``vae``
(the network) and ``loss`` (the objective of ``diffusekit.training.vae_losses``). Example (TOML)::

    [data]
    source = "fashion-mnist"
    [vae]
    preset = "mnist-f4"
    latent_channels = 4
    [loss]
    reconstruction = "l1"
    kl_weight = 1e-6
    [run]
    max_steps = 5000
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import MAX_WIDTH, check_flag, check_float, check_int
from diffusekit.training.config import (
    MAX_LIMIT,
    MAX_STEPS,
    DataConfig,
    EMAConfig,
    OptimConfig,
    RunConfig,
    SectionedConfig,
)
from diffusekit.training.vae_losses import RECONSTRUCTION_LOSSES


@dataclass
class VAEModelConfig:
    """The autoencoder: a named preset (``diffusekit.training.vae_presets``) plus VAEConfig field
    ``overrides``; ``latent_channels`` and ``downsample_factor`` (a power of two; the data's size must be a
    multiple of it) replace the preset's when set. ``scaling_examples``: training images the latent scaling
    factor is measured on at export (``diffusekit.training.vae_export``)."""

    preset: str = "mnist-f4"
    overrides: dict[str, Any] = field(default_factory=dict)
    latent_channels: int | None = None
    downsample_factor: int | None = None
    scaling_examples: int = 1024

    def validate(self) -> None:
        if not isinstance(self.preset, str):
            raise ConfigError(f"vae.preset must be a preset name, got {self.preset!r}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"vae.overrides must be a table/object of VAEConfig fields, got {self.overrides!r}")
        if self.latent_channels is not None:
            check_int("vae.latent_channels", self.latent_channels, 1, MAX_WIDTH)
        if self.downsample_factor is not None:
            check_int("vae.downsample_factor", self.downsample_factor, 1, 128)
        check_int("vae.scaling_examples", self.scaling_examples, 1, MAX_LIMIT)


@dataclass
class VAELossConfig:
    """The objective (Rombach et al. 2022, Appendix G): ``reconstruction`` ``l1`` or ``l2`` plus ``kl_weight``
    times the KL to N(0, I) summed over the latent (the paper uses ~1e-6 relative to the summed
    reconstruction loss; 1e-6 .. 1e-4 are sensible). ``adversarial``: add the PatchGAN hinge term
    (``diffusekit.training.vae_adversarial``) from step ``adversarial_start``, weighted by
    ``adversarial_weight`` times the adaptive weight; the discriminator (``discriminator_layers``,
    ``discriminator_channels``) has its own AdamW at ``optim.lr`` with the same betas. Off by default.
    ``sample_posterior``: decode z ~ q(z|x) during training (the paper's), not the posterior mean."""

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    adversarial: bool = False
    adversarial_start: int = 2000
    adversarial_weight: float = 0.5
    discriminator_layers: int = 2
    discriminator_channels: int = 32

    def validate(self) -> None:
        check_choice("loss.reconstruction", self.reconstruction, RECONSTRUCTION_LOSSES)
        check_float("loss.kl_weight", self.kl_weight, 0.0, 1e3)
        check_flag("loss.sample_posterior", self.sample_posterior)
        check_flag("loss.adversarial", self.adversarial)
        check_int("loss.adversarial_start", self.adversarial_start, 0, MAX_STEPS)
        check_float("loss.adversarial_weight", self.adversarial_weight, 0.0, 1e3)
        check_int("loss.discriminator_layers", self.discriminator_layers, 1, 6)
        check_int("loss.discriminator_channels", self.discriminator_channels, 1, 4096)


def default_optim() -> OptimConfig:
    """AdamW at 1e-4 with a short warmup: an autoencoder needs no long warmup."""
    return OptimConfig(lr=1e-4, warmup_steps=100, batch_size=32)


def default_run() -> RunConfig:
    return RunConfig(output_dir="runs/vae", max_steps=5000, sample_every=500, num_sample_images=16)


def default_ema() -> EMAConfig:
    return EMAConfig(decay=0.999)


@dataclass
class VAETrainConfig(SectionedConfig):
    """The whole configuration of an autoencoder training run (the sections above)."""

    WHAT = "a train-vae config"  # in messages

    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=default_optim)
    ema: EMAConfig = field(default_factory=default_ema)
    run: RunConfig = field(default_factory=default_run)
