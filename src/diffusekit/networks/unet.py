"""The U-Net denoiser of pixel-space DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")
and of latent diffusion / Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), after Ronneberger et al. 2015.

One network covers both: levels of residual blocks with optional attention, a bottleneck, and mirrored
up levels fed by skip connections. Attention is plain spatial self-attention when
``cross_attention_dim`` is None (pixel DDPM) and a transformer with cross-attention to text tokens
otherwise (LDM/SD). Conditioning enters by name (see STYLE.md): ``emb`` (time, class; added),
``concat`` (mask, masked image; stacked on channels), ``context`` (text tokens; cross-attention).

The module tree uses the reference weight names, so a diffusers ``UNet2DModel`` /
``UNet2DConditionModel`` state dict loads as it is. Its config is translated at the boundary by
:meth:`UNetConfig.from_diffusers` / :meth:`UNetConfig.to_diffusers`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from diffusekit.networks.attention import SpatialSelfAttention, SpatialTransformer
from diffusekit.networks.blocks import AttentionFactory, DownLevel, MidBlock, UpLevel, init_weights
from diffusekit.networks.embeddings import TimestepEmbedding, timestep_embedding
from diffusekit.networks.layers import Conv2d, GroupNorm

DOWNSAMPLE_PADS = ("symmetric", "right_bottom")
# our field names -> the reference config.json keys they come from (for error messages)
_REFERENCE_NAMES = {
    "channels": "block_out_channels",
    "num_heads": "attention_head_dim",
    "norm_groups": "norm_num_groups",
    "num_classes": "num_class_embeds",
    "transformer_depth": "transformer_layers_per_block",
}


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet`. Saved beside the weights.

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
        transformer_depth: transformer blocks per attention layer (cross-attention models only).
        use_linear_projection: Linear instead of 1x1-conv token projections in the transformers (SD-2.x).
        upcast_attention: compute attention in float32 even for half-precision inputs (SD-2.1).
        num_classes: size of the class-embedding table; None = not class-conditional.
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
    transformer_depth: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_classes: int | None = None
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
        n = len(self.channels)
        if n < 1:
            raise ConfigError("channels must list at least one level")
        for name in ("attention_levels", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{name} must have one entry per level ({n}), got {getattr(self, name)!r}")
        for name in ("in_channels", "out_channels", "layers_per_block", "transformer_depth", "norm_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for level, ch in enumerate(self.channels):
            if ch % self.norm_groups:
                raise ConfigError(
                    f"channels[{level}]={ch} is not divisible by norm_groups={self.norm_groups}"
                )
            if self.attention_levels[level] or (self.mid_attention and level == n - 1):
                if self.num_heads[level] < 1 or ch % self.num_heads[level]:
                    raise ConfigError(
                        f"num_heads[{level}]={self.num_heads[level]} must be >= 1 and divide "
                        f"channels[{level}]={ch}"
                    )
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be None or >= 1, got {self.num_classes!r}")
        if self.cross_attention_dim is not None and self.cross_attention_dim < 1:
            raise ConfigError(f"cross_attention_dim must be None or >= 1, got {self.cross_attention_dim!r}")
        check_choice("downsample_pad", self.downsample_pad, DOWNSAMPLE_PADS)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def emb_dim(self) -> int:
        """Width of the time (and class) embedding: 4 x channels[0] (DDPM)."""
        return 4 * self.channels[0]

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
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    @translating("UNet config")
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a UNet config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown UNetConfig keys {unknown}; known keys: {sorted(known)}")
        return _check_limits(cls(**d))

    # ---- the reference's config.json --------------------------------------------------------------
    @classmethod
    @translating("UNet config", names=_REFERENCE_NAMES)
    def from_diffusers(cls, d: dict[str, Any]) -> UNetConfig:
        """Translate a reference ``UNet2DModel`` / ``UNet2DConditionModel`` ``config.json`` dict.

        Unknown keys are ignored; values we do not implement raise ConfigError naming the key and the
        allowed values. Note the head-count semantics: in ``UNet2DModel`` ``attention_head_dim`` is the
        size of one head; in ``UNet2DConditionModel`` it is the number of heads (``num_attention_heads``
        takes precedence when set).
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a UNet config must be a JSON object, got {type(d).__name__}")
        class_name = d.get("_class_name") or (
            "UNet2DConditionModel" if "cross_attention_dim" in d else "UNet2DModel"
        )
        check_choice("_class_name", class_name, ("UNet2DModel", "UNet2DConditionModel"))
        conditional = class_name == "UNet2DConditionModel"
        defaults = _COND_DEFAULTS if conditional else _UNCOND_DEFAULTS
        d = {**defaults, **{k: v for k, v in d.items() if not k.startswith("_")}}
        for key, allowed in _REQUIRED_VALUES[class_name].items():
            check_choice(key, _plain(d.get(key)), allowed)

        channels = tuple(_ints("block_out_channels", d["block_out_channels"]))
        n = check_int("len(block_out_channels)", len(channels), 1, MAX_LEVELS)
        for key in ("down_block_types", "up_block_types"):
            if not isinstance(d[key], list | tuple):
                raise ConfigError(f"{key} must be a list of block names, got {d[key]!r}")
        attn_block, plain_down, plain_up = (
            ("CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D")
            if conditional
            else ("AttnDownBlock2D", "DownBlock2D", "UpBlock2D")
        )
        down_types = list(d["down_block_types"])
        if len(down_types) != n:
            raise ConfigError(f"down_block_types has {len(down_types)} entries, block_out_channels has {n}")
        for t in down_types:
            check_choice("down_block_types[i]", t, (plain_down, attn_block))
        attention_levels = tuple(t == attn_block for t in down_types)
        attn_up = attn_block.replace("Down", "Up")
        expected_up = [attn_up if a else plain_up for a in reversed(attention_levels)]
        if list(d["up_block_types"]) != expected_up:
            raise ConfigError(
                f"up_block_types={list(d['up_block_types'])!r} must mirror down_block_types; "
                f"allowed value: {expected_up!r}"
            )

        layers = _same("layers_per_block", d["layers_per_block"], n)
        if conditional:
            heads = d.get("num_attention_heads") or d["attention_head_dim"]
            num_heads = tuple(
                _ints("attention_head_dim", heads if isinstance(heads, list | tuple) else [heads] * n)
            )
            if len(num_heads) != n:
                raise ConfigError(
                    f"attention_head_dim / num_attention_heads must have {n} entries, got {heads!r}"
                )
            cross_dim = _same("cross_attention_dim", d["cross_attention_dim"], n)
            if isinstance(cross_dim, bool) or not isinstance(cross_dim, int):
                raise ConfigError(f"cross_attention_dim must be an integer, got {cross_dim!r}")
            depth = _same("transformer_layers_per_block", d["transformer_layers_per_block"], n)
            mid_attention = True
            extra = dict(
                cross_attention_dim=cross_dim,
                transformer_depth=depth,
                use_linear_projection=check_flag(
                    "use_linear_projection", d["use_linear_projection"]
                ),
                upcast_attention=check_flag("upcast_attention", d["upcast_attention"]),
            )
        else:
            head_dim = d["attention_head_dim"]
            if head_dim is not None and (
                isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1
            ):
                raise ConfigError(f"attention_head_dim must be None or a positive integer, got {head_dim!r}")
            # heads = channels // head_dim per level; None means one head of the full width
            num_heads = tuple(1 if head_dim is None else max(1, ch // head_dim) for ch in channels)
            for level, ch in enumerate(channels):
                uses = attention_levels[level] or (d["add_attention"] and level == n - 1)
                if uses and head_dim is not None and ch % head_dim:
                    raise ConfigError(
                        f"attention_head_dim={head_dim} does not divide block_out_channels[{level}]={ch}"
                    )
            if d["attn_norm_num_groups"] not in (None, d["norm_num_groups"]):
                raise ConfigError(
                    f"attn_norm_num_groups={d['attn_norm_num_groups']!r} is not supported; "
                    f"allowed values: None, {d['norm_num_groups']!r}"
                )
            mid_attention = check_flag("add_attention", d["add_attention"])
            extra = {}
        sample_size = d.get("sample_size")
        if isinstance(sample_size, list | tuple) and sample_size:
            sample_size = sample_size[0]
        config = cls(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            channels=channels,
            layers_per_block=layers,
            attention_levels=attention_levels,
            mid_attention=mid_attention,
            num_heads=num_heads,
            num_classes=d["num_class_embeds"],
            norm_groups=d["norm_num_groups"],
            norm_eps=check_float("norm_eps", d["norm_eps"], 0.0, 1.0, open_low=True),
            flip_sin_to_cos=check_flag("flip_sin_to_cos", d["flip_sin_to_cos"]),
            freq_shift=d["freq_shift"],
            downsample_pad="symmetric" if d["downsample_padding"] == 1 else "right_bottom",
            dropout=check_float("dropout", d["dropout"], 0.0, 1.0),
            sample_size=sample_size,
            **extra,
        )
        return _check_limits(config)

    def to_diffusers(self) -> dict[str, Any]:
        """The reference ``config.json`` for this config (``UNet2DConditionModel`` when
        ``cross_attention_dim`` is set, else ``UNet2DModel``); ConfigError if it cannot be expressed."""
        common = {
            "act_fn": "silu",
            "block_out_channels": list(self.channels),
            "center_input_sample": False,
            "class_embed_type": None,
            "downsample_padding": 1 if self.downsample_pad == "symmetric" else 0,
            "dropout": self.dropout,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_groups,
            "num_class_embeds": self.num_classes,
            "out_channels": self.out_channels,
            "resnet_time_scale_shift": "default",
            "sample_size": self.sample_size,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
        }
        if self.cross_attention_dim is None:
            down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels]
            up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)]
            used = [lv for lv in range(self.levels) if self.attention_levels[lv]]
            if self.mid_attention:
                used.append(self.levels - 1)
            head_dims = {self.channels[lv] // self.num_heads[lv] for lv in used}
            if all(self.num_heads[lv] == 1 for lv in used):
                head_dim = None
            elif len(head_dims) == 1:
                head_dim = head_dims.pop()
            else:
                raise ConfigError(
                    f"num_heads={self.num_heads!r} gives different head sizes {sorted(head_dims)}; "
                    "a UNet2DModel config needs one attention_head_dim"
                )
            for name, default in (
                ("transformer_depth", 1),
                ("use_linear_projection", False),
                ("upcast_attention", False),
            ):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} needs cross_attention_dim (a UNet2DConditionModel)"
                    )
            return {
                "_class_name": "UNet2DModel",
                **common,
                "add_attention": self.mid_attention,
                "attention_head_dim": head_dim,
                "attn_norm_num_groups": None,
                "down_block_types": down,
                "downsample_type": "conv",
                "mid_block_type": "UNetMidBlock2D",
                "num_train_timesteps": None,
                "up_block_types": up,
                "upsample_type": "conv",
            }
        if not self.mid_attention:
            raise ConfigError("mid_attention=False cannot be expressed as a UNet2DConditionModel config")
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        return {
            "_class_name": "UNet2DConditionModel",
            **common,
            "addition_embed_type": None,
            "attention_head_dim": heads,  # the reference's name for the NUMBER of heads
            "attention_type": "default",
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": self.cross_attention_dim,
            "cross_attention_norm": None,
            "down_block_types": [
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels
            ],
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "mid_block_only_cross_attention": None,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "num_attention_heads": None,
            "only_cross_attention": False,
            "projection_class_embeddings_input_dim": None,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "timestep_post_act": None,
            "transformer_layers_per_block": self.transformer_depth,
            "up_block_types": [
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)
            ],
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
        }


def _check_limits(c: UNetConfig) -> UNetConfig:
    """Refuse sizes beyond ``diffusekit.limits`` (and non-finite floats) before any module is built."""
    check_int("in_channels", c.in_channels, 1, MAX_WIDTH)
    check_int("out_channels", c.out_channels, 1, MAX_WIDTH)
    check_int("number of levels (block_out_channels)", len(c.channels), 1, MAX_LEVELS)
    for level, ch in enumerate(c.channels):
        check_int(f"block_out_channels[{level}]", ch, 1, MAX_WIDTH)
        check_int(f"num_heads[{level}]", c.num_heads[level], 1, MAX_WIDTH)
    check_int("layers_per_block", c.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
    check_int("transformer_layers_per_block", c.transformer_depth, 1, MAX_TRANSFORMER_DEPTH)
    check_int("norm_num_groups", c.norm_groups, 1, MAX_WIDTH)
    if c.cross_attention_dim is not None:
        check_int("cross_attention_dim", c.cross_attention_dim, 1, MAX_WIDTH)
    if c.num_classes is not None:
        check_int("num_class_embeds", c.num_classes, 1, MAX_CLASSES)
    if c.sample_size is not None:
        check_int("sample_size", c.sample_size, 1, MAX_SAMPLE_SIZE)
    check_float("norm_eps", c.norm_eps, 0.0, 1.0, open_low=True)
    check_float("freq_shift", c.freq_shift, -1e6, 1e6)
    check_float("dropout", c.dropout, 0.0, 1.0)
    for name in ("flip_sin_to_cos", "mid_attention", "use_linear_projection", "upcast_attention"):
        check_flag(name, getattr(c, name))
    for level, a in enumerate(c.attention_levels):
        check_flag(f"attention_levels[{level}]", a)
    return c


def _plain(v: Any) -> Any:
    """Lists of identical values (per-level settings) compare like their single value."""
    if isinstance(v, list | tuple) and v and all(x == v[0] for x in v):
        return v[0]
    return v


def _ints(name: str, values: Any) -> list[int]:
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise ConfigError(f"{name} must be a list of integers, got {values!r}")
    return list(values)


def _same(name: str, value: Any, n: int) -> Any:
    """A per-level setting we support only as one value for all levels."""
    if isinstance(value, list | tuple):
        if len(value) != n or any(v != value[0] for v in value):
            raise ConfigError(f"{name}={value!r}: only one value shared by all levels is supported")
        return value[0]
    return value


# Values the reference allows but we do not implement: key -> allowed values (defaults first).
_COMMON_REQUIRED: dict[str, tuple] = {
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1,),
    "class_embed_type": (None,),
    "time_embedding_dim": (None,),
    "downsample_padding": (1, 0),
}
_REQUIRED_VALUES: dict[str, dict[str, tuple]] = {
    "UNet2DModel": {
        **_COMMON_REQUIRED,
        "mid_block_type": ("UNetMidBlock2D",),
        "downsample_type": ("conv",),
        "upsample_type": ("conv",),
    },
    "UNet2DConditionModel": {
        **_COMMON_REQUIRED,
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": (False,),
        "dual_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "addition_embed_type": (None,),
        "time_cond_proj_dim": (None,),
        "timestep_post_act": (None,),
        "time_embedding_act_fn": (None,),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0,),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "attention_type": ("default",),
        "cross_attention_norm": (None,),
        "class_embeddings_concat": (False,),
        "projection_class_embeddings_input_dim": (None,),
        "reverse_transformer_layers_per_block": (None,),
    },
}
# The reference's defaults for keys missing from a config.json.
_SHARED_DEFAULTS: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "downsample_padding": 1,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "sample_size": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
}
_UNCOND_DEFAULTS: dict[str, Any] = {
    **_SHARED_DEFAULTS,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [224, 448, 672, 896],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "add_attention": True,
    "attention_head_dim": 8,
    "attn_norm_num_groups": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
}
_COND_DEFAULTS: dict[str, Any] = {
    **_SHARED_DEFAULTS,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "upcast_attention": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_act_fn": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
    "projection_class_embeddings_input_dim": None,
    "reverse_transformer_layers_per_block": None,
}


#: Named presets (the registry of STYLE.md point 5).
UNET_PRESETS: dict[str, UNetConfig] = {
    # DDPM CIFAR-10 (Ho et al. 2020): 35.7M parameters, 32x32, attention at 16x16, TF "SAME" downsampling.
    "ddpm-cifar10": UNetConfig(
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


class UNet(nn.Module):
    """The U-Net noise predictor: ``forward(x, t, *, context, class_labels, concat) -> (B, out, H, W)``.

    It returns the raw network output; what it means (eps, x0 or v) is the parametrization's business.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.time_embedding = TimestepEmbedding(c.channels[0], c.emb_dim)
        self.class_embedding = nn.Embedding(c.num_classes, c.emb_dim) if c.num_classes is not None else None
        self.conv_in = Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        common = dict(emb_dim=c.emb_dim, norm_groups=c.norm_groups, norm_eps=c.norm_eps, dropout=c.dropout)

        skip_channels = [c.channels[0]]  # channels of every tensor pushed on the skip stack
        down, prev = [], c.channels[0]
        for level, ch in enumerate(c.channels):
            last = level == c.levels - 1
            down.append(
                DownLevel(
                    prev,
                    ch,
                    num_layers=c.layers_per_block,
                    downsample=not last,
                    asymmetric_pad=c.downsample_pad == "right_bottom",
                    make_attention=self._attention_factory(level) if c.attention_levels[level] else None,
                    **common,
                )
            )
            skip_channels += [ch] * (c.layers_per_block + (0 if last else 1))
            prev = ch
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock(
            c.channels[-1],
            make_attention=self._attention_factory(c.levels - 1) if c.mid_attention else None,
            **common,
        )
        up = []
        for level in reversed(range(c.levels)):
            ch = c.channels[level]
            up.append(
                UpLevel(
                    prev,
                    ch,
                    num_layers=c.layers_per_block + 1,
                    skip_channels=[skip_channels.pop() for _ in range(c.layers_per_block + 1)],
                    upsample=level != 0,
                    make_attention=self._attention_factory(level) if c.attention_levels[level] else None,
                    **common,
                )
            )
            prev = ch
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = GroupNorm(c.norm_groups, c.channels[0], eps=c.norm_eps)
        self.conv_out = Conv2d(c.channels[0], c.out_channels, 3, padding=1)
        init_weights(self, zero=(self.conv_out,))

    def _attention_factory(self, level: int) -> AttentionFactory:
        c = self.config
        heads = c.num_heads[level]
        if c.cross_attention_dim is None:
            return lambda ch: SpatialSelfAttention(
                ch, heads=heads, norm_groups=c.norm_groups, norm_eps=c.norm_eps
            )
        return lambda ch: SpatialTransformer(
            ch,
            heads=heads,
            context_dim=c.cross_attention_dim,
            depth=c.transformer_depth,
            norm_groups=c.norm_groups,
            linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy ``x`` (B, C, H, W) at timesteps ``t`` (0-d or (B,), int or float; fractional
        values are used as they are). ``context`` (B, L, cross_attention_dim): text tokens for
        cross-attention. ``class_labels`` (B,) int64. ``concat`` (B, C', H, W): extra channels stacked
        after ``x`` (inpainting mask + masked latents), so that C + C' == in_channels."""
        t = self._check_inputs(x, t, context, class_labels, concat)
        c = self.config
        if concat is not None:
            x = torch.cat([x, concat], dim=1)  # (B, in_channels, H, W)
        features = timestep_embedding(
            t, c.channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        emb = self.time_embedding(features.to(x.dtype))  # (B, 4*C0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)  # (B, 4*C0)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, context)  # (B, C_l, H/2^l, W/2^l) after level l's downsample
            skips += outputs
        h = self.mid_block(h, emb, context)  # (B, C_last, H/2^(L-1), W/2^(L-1))
        for block in self.up_blocks:
            h = block(h, skips, emb, context)  # consumes layers_per_block + 1 skips per level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    def _check_inputs(
        self,
        x: Any,
        t: Any,
        context: Any,
        class_labels: Any,
        concat: Any,
    ) -> torch.Tensor:
        """Validate the arguments of forward() with messages that name them; return ``t`` as a (B,) tensor."""
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ConfigError(f"x must be a (B, C, H, W) tensor, got {_describe(x)}")
        B, C, H, W = x.shape
        extra = 0
        if concat is not None:
            if (
                not isinstance(concat, torch.Tensor)
                or concat.ndim != 4
                or concat.shape[0] != B
                or concat.shape[2:] != x.shape[2:]
            ):
                raise ConfigError(
                    f"concat must be a ({B}, C', {H}, {W}) tensor matching x, got {_describe(concat)}"
                )
            extra = concat.shape[1]
        if C + extra != c.in_channels:
            what = f"x has {C} channels" + (f" and concat {extra}" if concat is not None else "")
            raise ConfigError(
                f"this UNet expects {c.in_channels} input channels; {what} (x shape {tuple(x.shape)})"
            )
        f = c.downsample_factor
        if H % f or W % f:
            raise ConfigError(
                f"x height and width must be multiples of {f} (2**(levels-1), levels={c.levels}), got {H}x{W}"
            )
        # a GroupNorm that sees one value per group has no variance: refuse inputs that small
        per_group = min(
            min(c.channels[max(level - 1, 0)], ch) // c.norm_groups * (H >> level) * (W >> level) * B
            for level, ch in enumerate(c.channels)
        )
        if per_group <= 1:
            raise ConfigError(
                f"x is too small: at {H}x{W} (batch {B}) a GroupNorm of this UNet sees one value per group; "
                f"use at least {2 * f}x{f} pixels"
            )

        if not isinstance(t, torch.Tensor):
            try:
                t = torch.tensor(t, device=x.device)
            except (TypeError, ValueError, RuntimeError):
                raise ConfigError(f"t must be a number or a 0-d / ({B},) tensor, got {t!r}") from None
        if (
            t.ndim > 1
            or (t.ndim == 1 and t.shape[0] not in (1, B))
            or t.is_complex()
            or t.dtype == torch.bool
        ):
            raise ConfigError(f"t must be a real 0-d or ({B},) tensor, got {_describe(t)}")
        t = t.to(x.device).reshape(-1).expand(B)

        if c.needs_context:
            D = c.cross_attention_dim
            if context is None:
                raise ConfigError(
                    f"context is required: this UNet cross-attends to tokens of width {D}; pass (B, L, {D})"
                )
            if (
                not isinstance(context, torch.Tensor)
                or context.ndim != 3
                or context.shape[-1] != D
                or context.shape[0] != B
            ):
                raise ConfigError(
                    f"context must be a ({B}, L, {D}) tensor (cross_attention_dim={D}), "
                    f"got {_describe(context)}"
                )
        elif context is not None:
            raise ConfigError("context was given but this UNet has no cross-attention; pass context=None")

        if c.num_classes is not None:
            n = c.num_classes
            if class_labels is None:
                raise ConfigError(f"class_labels is required: this UNet is class-conditional ({n} classes)")
            if (
                not isinstance(class_labels, torch.Tensor)
                or class_labels.shape != (B,)
                or class_labels.is_floating_point()
                or class_labels.is_complex()
            ):
                raise ConfigError(
                    f"class_labels must be an integer ({B},) tensor, got {_describe(class_labels)}"
                )
            if B and (int(class_labels.min()) < 0 or int(class_labels.max()) >= n):
                raise ConfigError(f"class_labels must be in [0, {n - 1}], got values {class_labels.tolist()}")
        elif class_labels is not None:
            raise ConfigError(
                "class_labels was given but this UNet is not class-conditional; pass class_labels=None"
            )
        return t


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:200]
