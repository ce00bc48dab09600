"""U-Net presets for training from scratch, and the assembly of a training run's UNetConfig.

``mnist-small`` is the main job's model (about 1M parameters; fits a ~15-minute CPU budget), ``mnist-base``
the quality benchmark's, ``test-tiny`` the tests'. Any name in ``diffusekit.networks.unet.UNET_PRESETS``
works too. Channels, sample size and the class table are always set from the data.
"""

from __future__ import annotations

from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNET_PRESETS, UNetConfig

TRAIN_PRESETS: dict[str, UNetConfig] = {
    # 28x28 -> 14 -> 7, self-attention at 7x7 and in the bottleneck; ~1.1M parameters
    "mnist-small": UNetConfig(
        channels=(32, 64, 64),
        layers_per_block=1,
        attention_levels=(False, False, True),
        num_heads=(1, 1, 2),
        norm_groups=8,
    ),
    # wider and deeper, for longer runs (benchmarks/quality_mnist.py); ~6M parameters
    "mnist-base": UNetConfig(
        channels=(64, 128, 128),
        layers_per_block=2,
        attention_levels=(False, False, True),
        num_heads=(1, 1, 4),
        norm_groups=16,
    ),
    # latent models (8x8 latents of 32px images at f=4, up to 32x32 latents): attention at the two coarser levels,
    # transformer blocks with cross-attention when trained on captions; ~2.5M parameters
    "latent-small": UNetConfig(
        channels=(64, 128, 128),
        layers_per_block=1,
        attention_levels=(False, True, True),
        num_heads=(1, 4, 4),
        norm_groups=16,
    ),
    # the 7x7x4 latents of 28px images at f=4 (train-vae's mnist-f4): 7 cannot be halved, so one resolution level,
    # every block followed by attention over the 49 positions (cross-attention with captions); ~2.2M parameters
    "latent-7x7": UNetConfig(
        channels=(96,),
        layers_per_block=2,
        attention_levels=(True,),
        num_heads=(4,),
        norm_groups=32,
    ),
    # a few thousand parameters with one attention level (cross-attention with captions): for tests
    "latent-tiny": UNetConfig(
        channels=(8, 16),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=(1, 2),
        norm_groups=4,
    ),
    # a few thousand parameters, no attention: for tests
    "test-tiny": UNetConfig(
        channels=(8, 16),
        layers_per_block=1,
        attention_levels=(False, False),
        num_heads=(1, 1),
        norm_groups=4,
        mid_attention=False,
    ),
}


def preset_names() -> list[str]:
    return sorted(set(TRAIN_PRESETS) | set(UNET_PRESETS))


def build_unet_config(
    preset: str,
    overrides: dict[str, Any],
    *,
    channels: int,
    resolution: int,
    num_classes: int | None,
    context_dim: int | None = None,
    pixels_per_input: int = 1,
) -> UNetConfig:
    """The preset with ``overrides`` applied, its image channels/size set from the data, and
    ``num_classes + 1`` class ids when class-conditional (the last id means "no class", for label dropout
    and classifier-free guidance); ``num_classes=None`` builds an unconditional network. ``context_dim``: the
    width of the text tokens of a caption-conditioned network (its attention becomes transformer blocks with
    cross-attention); None refuses text-conditioned presets. ``pixels_per_input``: image pixels per network
    input pixel (a latent model's VAE downsampling factor), so that a size error names the image size to choose."""
    base = TRAIN_PRESETS.get(preset) or UNET_PRESETS.get(preset)
    if base is None:
        raise ConfigError(f"model.preset={preset!r} is not known; allowed: {', '.join(preset_names())}")
    d = base.to_dict()
    d.update(overrides)
    d.update(
        in_channels=channels,
        out_channels=channels,
        sample_size=resolution,
        num_classes=None if num_classes is None else num_classes + 1,
    )
    if context_dim is not None:
        d["cross_attention_dim"] = context_dim
        if not (any(d["attention_levels"]) or d.get("mid_attention", True)):
            raise ConfigError(f"model.preset={preset!r} has no attention layers, which text conditioning needs")
    elif d.get("cross_attention_dim") is not None:
        raise ConfigError(
            f"model.preset={preset!r} is a text-conditioned (cross-attention) network; training "
            "text-to-image models is not supported here"
        )
    config = UNetConfig.from_dict(d)
    f, k = config.downsample_factor, pixels_per_input
    if resolution % f:
        latent = f" ({resolution} px latents of a {k}x downsampling VAE)" if k > 1 else ""
        raise ConfigError(
            f"data resolution {resolution * k}{latent} is not a multiple of {f * k}, which the {config.levels}-level "
            f"U-Net needs; set data.resolution to a multiple of {f * k} (e.g. {(resolution + f - resolution % f) * k})"
        )
    return config
