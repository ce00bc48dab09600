"""Autoencoder presets for ``diffusekit train-vae``, and the assembly of a run's :class:`VAEConfig`.

The downsampling factor f of an :class:`AutoencoderKL` is 2**(levels - 1); the presets follow Rombach et al.
2022 (Table 8 and Appendix G): ``kl-f8`` is their (and Stable Diffusion's) f=8 autoencoder with 4 latent
channels for 256^2 images and up, ``mnist-f4`` a small f=4 one for 28x28 data (28 -> 7, 4 latent channels),
``test-tiny`` (f=4, a few thousand parameters) the tests'. Any name in ``diffusekit.networks.vae.VAE_PRESETS``
works too. Image channels and the sample size are always set from the data.
"""

from __future__ import annotations

from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.limits import MAX_LEVELS
from diffusekit.networks.vae import VAE_PRESETS, VAEConfig

TRAIN_VAE_PRESETS: dict[str, VAEConfig] = {
    # 28x28 -> 14 -> 7 with 4 latent channels; ~0.95M parameters
    "mnist-f4": VAEConfig(latent_channels=4, channels=(32, 64, 64), layers_per_block=1, norm_groups=8),
    # Rombach et al. 2022's KL-f8 (ch 128, ch_mult 1,2,4,4, 2 residual blocks, z 4): the SD-1.x VAE, ~84M
    "kl-f8": VAEConfig(latent_channels=4, channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32),
    # f=4, no attention, a few thousand parameters: for tests
    "test-tiny": VAEConfig(
        latent_channels=4, channels=(8, 16, 16), layers_per_block=1, norm_groups=4, mid_attention=False
    ),
}


def vae_preset_names() -> list[str]:
    return sorted(set(TRAIN_VAE_PRESETS) | set(VAE_PRESETS))


def build_vae_config(
    preset: str,
    overrides: dict[str, Any],
    *,
    channels: int,
    resolution: int,
    latent_channels: int | None = None,
    downsample_factor: int | None = None,
) -> VAEConfig:
    """The preset with ``overrides`` (any VAEConfig field) applied, then ``latent_channels`` and
    ``downsample_factor`` when given, image channels and sample size from the data, and a scaling factor of 1
    (the real one is measured on the data after training).

    ``downsample_factor`` (a power of two) sets the number of levels to log2(f) + 1: the preset's first
    levels are kept, or its last level's width repeated for more levels. Raises ConfigError naming
    ``data.resolution`` when the data's size is not a multiple of the factor.
    """
    base = TRAIN_VAE_PRESETS.get(preset) or VAE_PRESETS.get(preset)
    if base is None:
        raise ConfigError(f"vae.preset={preset!r} is not known; allowed: {', '.join(vae_preset_names())}")
    d = base.to_dict()
    if not isinstance(overrides, dict):
        raise ConfigError(f"vae.overrides must be a table/object of VAEConfig fields, got {overrides!r}")
    d.update(overrides)
    if latent_channels is not None:
        d["latent_channels"] = latent_channels
    if downsample_factor is not None:
        factors = [2**i for i in range(MAX_LEVELS)]
        if downsample_factor not in factors:
            raise ConfigError(
                f"vae.downsample_factor must be a power of two from 1 to {factors[-1]}, got {downsample_factor!r}"
            )
        levels = factors.index(downsample_factor) + 1
        ch = list(d["channels"])
        d["channels"] = ch[:levels] + [ch[-1]] * max(0, levels - len(ch))
    d.update(in_channels=channels, out_channels=channels, sample_size=resolution, scaling_factor=1.0,
             shift_factor=None)  # fmt: skip
    config = VAEConfig.from_dict(d)
    f = config.downsample_factor
    if resolution % f:
        up = resolution + f - resolution % f
        raise ConfigError(
            f"data resolution {resolution} is not a multiple of the autoencoder's downsampling factor {f}; set "
            f"data.resolution to a multiple of {f} (e.g. {up}) or choose a smaller vae.downsample_factor"
        )
    return config
