"""The U-Net's own config: :class:`UNetConfig`, its validation and the named presets.

A config is checked when it is built, before any module exists: every size against the bounds of
``diffusekit.limits`` (a config may come from a stranger's file), and the shapes against each other (widths
divisible by the GroupNorm groups and by the head counts). Messages name our fields; the translation of the
reference's ``config.json`` (``diffusekit.io.unet_config``) renames them to the file's keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import (
    MAX_CLASSES,
    MAX_LAYERS_PER_BLOCK,
    MAX_LEVELS,
    MAX_SAMPLE_SIZE,
    MAX_TRANSFORMER_DEPTH,
    MAX_WIDTH,
    check_flag,
    check_float,
    check_int,
    translating,
)
from diffusekit.networks.config_dict import config_from_dict, config_to_dict

DOWNSAMPLE_PADS = ("symmetric", "right_bottom")


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`~diffusekit.networks.unet.UNet`. Saved beside the weights.

    Attributes:
        in_channels: input channels (4 for SD latents, 9 for SD inpainting: latents + mask + masked
            latents, 3 for RGB pixels).
        out_channels: output channels.
        channels: feature channels of each resolution level; a 2x downsample follows every level but
            the last.
        layers_per_block: residual blocks per down level (up levels have one more).
        attention_levels: per level, whether its residual blocks are followed by attention.
        mid_attention: whether the bottleneck has attention between its two residual blocks.
        num_heads: per level, the NUMBER of attention heads (head size = channels // heads). The
            bottleneck uses ``num_heads[-1]``.
        cross_attention_dim: width of the text tokens (``context``); None means attention layers are
            plain spatial self-attention (pixel DDPM), an int means LDM transformer blocks with
            self- and cross-attention.
        transformer_depth: transformer blocks per attention layer (cross-attention models only): one number
            for every level, or one per level (SDXL: 1, 2, 10); up levels use their level's entry and the
            bottleneck the last level's.
        use_linear_projection: Linear instead of 1x1-conv token projections in the transformers (SD-2.x).
        upcast_attention: compute attention in float32 even for half-precision inputs (SD-2.1).
        text_only_attention: per level, whether the first attention of its transformer blocks attends to the
            text tokens instead of the image, so that every attention there is cross-attention (the SD x4
            upscaler; the reference's ``only_cross_attention``). None: no level. The bottleneck always uses
            self-attention first.
        num_classes: size of the class-embedding table; None = not class-conditional.
        text_time_features: input width of the added text/time embedding of SDXL (Podell et al. 2023,
            sec. 2.2, "micro-conditioning"): a pooled text embedding followed by the sinusoidal features of
            each size/crop value (``time_ids``), mapped by a 2-layer MLP and added to the time embedding.
            Equals the pooled width + number of time ids x ``time_id_features``. None: no added embedding.
        time_id_features: width of the sinusoidal features of one time id (with ``text_time_features``).
        norm_groups, norm_eps: GroupNorm groups and epsilon of residual blocks and attention norms.
        flip_sin_to_cos, freq_shift: sinusoidal timestep features (see ``timestep_embedding``).
        downsample_pad: "symmetric" (pad 1 on every side) or "right_bottom" (TF "SAME" padding of the
            original DDPM code: one zero row/column at the bottom/right).
        dropout: dropout probability in the residual blocks (training only).
        sample_size: the spatial size the model was trained at (a hint for pipelines; None = unknown).
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (False, True, False, False)
    mid_attention: bool = True
    num_heads: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    text_only_attention: tuple[bool, ...] | None = None
    num_classes: int | None = None
    text_time_features: int | None = None
    time_id_features: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_pad: str = "symmetric"
    dropout: float = 0.0
    sample_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("channels", "attention_levels", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("text_only_attention", "transformer_depth"):
            if isinstance(getattr(self, name), list | tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_sizes(self)
        n = self.levels
        for level, ch in enumerate(self.channels):
            if ch % self.norm_groups:
                raise ConfigError(f"channels[{level}]={ch} is not divisible by norm_groups={self.norm_groups}")
            uses_attention = self.attention_levels[level] or (self.mid_attention and level == n - 1)
            if uses_attention and ch % self.num_heads[level]:
                raise ConfigError(f"num_heads[{level}]={self.num_heads[level]} must divide channels[{level}]={ch}")

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def emb_dim(self) -> int:
        """Width of the time (and class) embedding: 4 x channels[0] (DDPM)."""
        return 4 * self.channels[0]

    @property
    def depth_per_level(self) -> tuple[int, ...]:
        """Transformer blocks per attention layer of each level (``transformer_depth`` spread over the levels)."""
        d = self.transformer_depth
        return d if isinstance(d, tuple) else (d,) * self.levels

    @property
    def needs_context(self) -> bool:
        """Whether forward() requires ``context`` (the model has cross-attention layers)."""
        return self.cross_attention_dim is not None and (any(self.attention_levels) or self.mid_attention)

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.levels - 1)

    # ---- our own JSON form (plain field names) --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    @translating("UNet config")
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        return config_from_dict(cls, d)


def _check_sizes(c: UNetConfig) -> None:
    """Refuse sizes beyond ``diffusekit.limits``, values of the wrong type and non-finite floats, before any
    module is built (and before the shape checks do arithmetic on them)."""
    n = check_int("number of levels (channels)", c.levels, 1, MAX_LEVELS)
    for name in ("attention_levels", "num_heads"):
        if len(getattr(c, name)) != n:
            raise ConfigError(f"{name} must have one entry per level ({n}), got {getattr(c, name)!r}")
    check_int("in_channels", c.in_channels, 1, MAX_WIDTH)
    check_int("out_channels", c.out_channels, 1, MAX_WIDTH)
    for level in range(n):
        check_int(f"channels[{level}]", c.channels[level], 1, MAX_WIDTH)
        check_int(f"num_heads[{level}]", c.num_heads[level], 1, MAX_WIDTH)
        check_flag(f"attention_levels[{level}]", c.attention_levels[level])
    if c.text_only_attention is not None:
        if not isinstance(c.text_only_attention, tuple) or len(c.text_only_attention) != n:
            raise ConfigError(f"text_only_attention must be None or one flag per level ({n}), "
                              f"got {c.text_only_attention!r}")  # fmt: skip
        for level in range(n):
            check_flag(f"text_only_attention[{level}]", c.text_only_attention[level])
        if c.cross_attention_dim is None and any(c.text_only_attention):
            raise ConfigError("text_only_attention needs cross_attention_dim (text tokens to attend to)")
    check_int("layers_per_block", c.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
    if isinstance(c.transformer_depth, tuple):
        if len(c.transformer_depth) != n:
            raise ConfigError(
                f"transformer_depth must be one number or one per level ({n}), got {c.transformer_depth!r}"
            )
        for level, depth in enumerate(c.transformer_depth):
            check_int(f"transformer_depth[{level}]", depth, 1, MAX_TRANSFORMER_DEPTH)
    else:
        check_int("transformer_depth", c.transformer_depth, 1, MAX_TRANSFORMER_DEPTH)
    if (c.text_time_features is None) != (c.time_id_features is None):
        raise ConfigError("text_time_features and time_id_features must be given together (or both be None), got "
                          f"{c.text_time_features!r} and {c.time_id_features!r}")  # fmt: skip
    if c.text_time_features is not None:
        check_int("text_time_features", c.text_time_features, 1, MAX_WIDTH)
        check_int("time_id_features", c.time_id_features, 1, MAX_WIDTH)
    check_int("norm_groups", c.norm_groups, 1, MAX_WIDTH)
    if c.cross_attention_dim is not None:
        check_int("cross_attention_dim", c.cross_attention_dim, 1, MAX_WIDTH)
    if c.num_classes is not None:
        check_int("num_classes", c.num_classes, 1, MAX_CLASSES)
    if c.sample_size is not None:
        check_int("sample_size", c.sample_size, 1, MAX_SAMPLE_SIZE)
    check_float("norm_eps", c.norm_eps, 0.0, 1.0, open_low=True)
    check_float("freq_shift", c.freq_shift, -1e6, 1e6)
    check_float("dropout", c.dropout, 0.0, 1.0)
    for name in ("flip_sin_to_cos", "mid_attention", "use_linear_projection", "upcast_attention"):
        check_flag(name, getattr(c, name))
    check_choice("downsample_pad", c.downsample_pad, DOWNSAMPLE_PADS)


# DDPM CIFAR-10 (Ho et al. 2020): 35.7M parameters, 32x32, attention at 16x16, TF "SAME" downsampling.
_DDPM_CIFAR10 = UNetConfig(
    in_channels=3,
    out_channels=3,
    channels=(128, 256, 256, 256),
    layers_per_block=2,
    attention_levels=(False, True, False, False),
    num_heads=(1, 1, 1, 1),
    norm_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_pad="right_bottom",
    dropout=0.1,
    sample_size=32,
)

#: Named presets (the registry of STYLE.md point 5).
UNET_PRESETS: dict[str, UNetConfig] = {
    "ddpm-cifar10": _DDPM_CIFAR10,
    # DDPM CelebA-HQ / LSUN 256x256 (Ho et al. 2020, the 256-pixel models): 113.7M parameters, six levels, attention
    # at 16x16, the CIFAR-10 model's conventions. Benchmark workloads W7/W8 (DDIM 50 / DDPM 1000 steps per image).
    "ddpm-celebahq-256": dataclasses.replace(
        _DDPM_CIFAR10,
        channels=(128, 128, 256, 256, 512, 512),
        attention_levels=(False, False, False, False, True, False),
        num_heads=(1,) * 6,
        dropout=0.0,
        sample_size=256,
    ),
    # Stable Diffusion 1.x (Rombach et al. 2022): ~860M parameters, 8 heads, CLIP ViT-L/14 text (768).
    "sd15": UNetConfig(
        in_channels=4,
        out_channels=4,
        channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        num_heads=(8, 8, 8, 8),
        cross_attention_dim=768,
        norm_groups=32,
        norm_eps=1e-5,
        sample_size=64,
    ),
    # Stable Diffusion 2.x: 64-wide heads, OpenCLIP ViT-H text (1024), linear projections.
    "sd2": UNetConfig(
        in_channels=4,
        out_channels=4,
        channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(True, True, True, False),
        num_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        norm_groups=32,
        sample_size=96,
    ),
    # A few-thousand-parameter pixel model for tests and demos (16x16 RGB).
    "tiny": UNetConfig(
        in_channels=3,
        out_channels=3,
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=(1, 2),
        norm_groups=8,
        sample_size=16,
    ),
    # A tiny latent text-to-image model (4-channel latents, 32-wide text tokens).
    "tiny-text": UNetConfig(
        in_channels=4,
        out_channels=4,
        channels=(32, 64),
        layers_per_block=1,
        attention_levels=(True, False),
        num_heads=(2, 2),
        cross_attention_dim=32,
        norm_groups=8,
        sample_size=8,
    ),
}
UNET_PRESETS["sd15-inpaint"] = dataclasses.replace(UNET_PRESETS["sd15"], in_channels=9)
