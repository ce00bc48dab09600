"""The reference's (diffusers) U-Net ``config.json`` <-> our :class:`UNetConfig`.

Two reference classes map onto our one U-Net: ``UNet2DModel`` (pixel DDPM: spatial self-attention, optional
class embedding) and ``UNet2DConditionModel`` (latent diffusion: transformers with cross-attention to text).
:func:`unet_from_diffusers` reads either; :func:`unet_to_diffusers` writes the one our config is. Keys the
reference adds for features we do not implement must hold the values listed in ``_SUPPORTED`` (the first one
is the reference's default), so a config we cannot run is refused with the key and the allowed values named,
never silently misread. The state-dict keys need no renaming beyond ``io.diffusers_keys``.
"""

from __future__ import annotations

from typing import Any

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import MAX_LEVELS, check_flag, check_float, check_int, translating
from diffusekit.networks.config_dict import config_to_dict
from diffusekit.networks.unet_config import UNetConfig

UNCONDITIONAL, CONDITIONAL = "UNet2DModel", "UNet2DConditionModel"

# our field names -> the reference config.json keys they come from (for error messages)
_FILE_KEYS = {
    "channels": "block_out_channels",
    "num_heads": "attention_head_dim",
    "norm_groups": "norm_num_groups",
    "num_classes": "num_class_embeds",
    "transformer_depth": "transformer_layers_per_block",
    "text_time_features": "projection_class_embeddings_input_dim",
    "time_id_features": "addition_time_embed_dim",
}

# Values the reference allows but we do not implement: key -> the values we support, the reference's default first.
_SUPPORTED_BY_BOTH: dict[str, tuple] = {
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "mid_block_scale_factor": (1,),
    "class_embed_type": (None,),
    "time_embedding_dim": (None,),
    "downsample_padding": (1, 0),
}
_SUPPORTED: dict[str, dict[str, tuple]] = {
    UNCONDITIONAL: {
        **_SUPPORTED_BY_BOTH,
        "mid_block_type": ("UNetMidBlock2D",),
        "downsample_type": ("conv",),
        "upsample_type": ("conv",),
    },
    CONDITIONAL: {
        **_SUPPORTED_BY_BOTH,
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "dual_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "addition_embed_type": (None, "text_time"),
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
        "reverse_transformer_layers_per_block": (None,),
    },
}
# The reference's defaults for the other keys missing from a config.json (see _reference_defaults).
_DEFAULTS_OF_BOTH: dict[str, Any] = {
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "layers_per_block": 2,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "sample_size": None,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    UNCONDITIONAL: {
        **_DEFAULTS_OF_BOTH,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [224, 448, 672, 896],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "add_attention": True,
        "attention_head_dim": 8,
        "attn_norm_num_groups": None,
    },
    CONDITIONAL: {
        **_DEFAULTS_OF_BOTH,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "attention_head_dim": 8,
        "num_attention_heads": None,
        "cross_attention_dim": 1280,
        "transformer_layers_per_block": 1,
        "use_linear_projection": False,
        "upcast_attention": False,
        "only_cross_attention": False,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    },
}
# the attention block of an attention level, per reference class; other levels are plain
_ATTENTION_DOWN = {UNCONDITIONAL: "AttnDownBlock2D", CONDITIONAL: "CrossAttnDownBlock2D"}


@translating("UNet config", names=_FILE_KEYS)
def unet_from_diffusers(d: dict[str, Any]) -> UNetConfig:
    """Translate a reference ``UNet2DModel`` / ``UNet2DConditionModel`` ``config.json`` dict.

    Unknown keys are ignored; values we do not implement raise ConfigError naming the key and the
    allowed values. Note the head-count semantics: in ``UNet2DModel`` ``attention_head_dim`` is the
    size of one head; in ``UNet2DConditionModel`` it is the number of heads (``num_attention_heads``
    takes precedence when set).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"a UNet config must be a JSON object, got {type(d).__name__}")
    kind = d.get("_class_name") or (CONDITIONAL if "cross_attention_dim" in d else UNCONDITIONAL)
    check_choice("_class_name", kind, (UNCONDITIONAL, CONDITIONAL))
    d = {**_reference_defaults(kind), **{k: v for k, v in d.items() if not k.startswith("_")}}
    for key, allowed in _SUPPORTED[kind].items():
        check_choice(key, _plain(d.get(key)), allowed)

    channels = tuple(_ints("block_out_channels", d["block_out_channels"]))
    n = check_int("len(block_out_channels)", len(channels), 1, MAX_LEVELS)
    attention_levels = _attention_levels(d, kind, n)
    layers = _same("layers_per_block", d["layers_per_block"], n)
    if kind == CONDITIONAL:
        heads = d.get("num_attention_heads") or d["attention_head_dim"]
        num_heads = tuple(_ints("attention_head_dim", heads if isinstance(heads, list | tuple) else [heads] * n))
        if len(num_heads) != n:
            raise ConfigError(f"attention_head_dim / num_attention_heads must have {n} entries, got {heads!r}")
        cross_dim = _same("cross_attention_dim", d["cross_attention_dim"], n)
        if isinstance(cross_dim, bool) or not isinstance(cross_dim, int):
            raise ConfigError(f"cross_attention_dim must be an integer, got {cross_dim!r}")
        mid_attention = True
        extra = dict(
            cross_attention_dim=cross_dim,
            transformer_depth=_transformer_depth(d["transformer_layers_per_block"], n),
            use_linear_projection=check_flag("use_linear_projection", d["use_linear_projection"]),
            upcast_attention=check_flag("upcast_attention", d["upcast_attention"]),
            text_only_attention=_text_only_attention(d, n),
            **_text_time(d),
        )
    else:
        head_dim = d["attention_head_dim"]
        if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
            raise ConfigError(f"attention_head_dim must be None or a positive integer, got {head_dim!r}")
        # heads = channels // head_dim per level; None means one head of the full width
        num_heads = tuple(1 if head_dim is None else max(1, ch // head_dim) for ch in channels)
        for level, ch in enumerate(channels):
            uses = attention_levels[level] or (d["add_attention"] and level == n - 1)
            if uses and head_dim is not None and ch % head_dim:
                raise ConfigError(f"attention_head_dim={head_dim} does not divide block_out_channels[{level}]={ch}")
        if d["attn_norm_num_groups"] not in (None, d["norm_num_groups"]):
            raise ConfigError(
                f"attn_norm_num_groups={d['attn_norm_num_groups']!r} is not supported; "
                f"allowed values: None, {d['norm_num_groups']!r}"
            )
        mid_attention = check_flag("add_attention", d["add_attention"])
        extra = {}
    return UNetConfig(
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
        sample_size=first_size(d["sample_size"]),
        **extra,
    )


def unet_to_diffusers(c: UNetConfig) -> dict[str, Any]:
    """The reference ``config.json`` for ``c`` (``UNet2DConditionModel`` when ``cross_attention_dim`` is
    set, else ``UNet2DModel``); ConfigError if it cannot be expressed."""
    kind = UNCONDITIONAL if c.cross_attention_dim is None else CONDITIONAL
    attn_down = _ATTENTION_DOWN[kind]
    attn_up = attn_down.replace("Down", "Up")
    out = {
        "_class_name": kind,
        **_supported_defaults(kind),
        "block_out_channels": list(c.channels),
        "down_block_types": [attn_down if a else "DownBlock2D" for a in c.attention_levels],
        "downsample_padding": 1 if c.downsample_pad == "symmetric" else 0,
        "dropout": c.dropout,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "in_channels": c.in_channels,
        "layers_per_block": c.layers_per_block,
        "norm_eps": c.norm_eps,
        "norm_num_groups": c.norm_groups,
        "num_class_embeds": c.num_classes,
        "out_channels": c.out_channels,
        "sample_size": c.sample_size,
        "up_block_types": [attn_up if a else "UpBlock2D" for a in reversed(c.attention_levels)],
    }
    if kind == UNCONDITIONAL:
        for name, default in (("transformer_depth", 1), ("use_linear_projection", False), ("upcast_attention", False),
                              ("text_time_features", None)):  # fmt: skip
            if getattr(c, name) != default:
                raise ConfigError(f"{name}={getattr(c, name)!r} needs cross_attention_dim (a UNet2DConditionModel)")
        return {
            **out,
            "add_attention": c.mid_attention,
            "attention_head_dim": _head_size(c),
            "attn_norm_num_groups": None,
            "num_train_timesteps": None,
        }
    if not c.mid_attention:
        raise ConfigError("mid_attention=False cannot be expressed as a UNet2DConditionModel config")
    return {
        **out,
        # the reference's name for the NUMBER of heads
        "attention_head_dim": c.num_heads[0] if len(set(c.num_heads)) == 1 else list(c.num_heads),
        "cross_attention_dim": c.cross_attention_dim,
        "num_attention_heads": None,
        "only_cross_attention": False if c.text_only_attention is None else list(c.text_only_attention),
        "transformer_layers_per_block": config_to_dict(c)["transformer_depth"],
        **_text_time_keys(c),
        "upcast_attention": c.upcast_attention,
        "use_linear_projection": c.use_linear_projection,
    }


def _supported_defaults(kind: str) -> dict[str, Any]:
    """The reference's default of every key in ``_SUPPORTED[kind]`` (its first allowed value)."""
    return {key: allowed[0] for key, allowed in _SUPPORTED[kind].items()}


def _reference_defaults(kind: str) -> dict[str, Any]:
    """What the reference assumes for each key a ``kind`` config.json leaves out."""
    return {**_supported_defaults(kind), **_DEFAULTS[kind]}


def first_size(sample_size: Any) -> Any:
    """A reference ``sample_size``: one number, or a (height, width) list read as its first entry."""
    if isinstance(sample_size, list | tuple) and sample_size:
        return sample_size[0]
    return sample_size


def block_types(d: dict[str, Any], key: str, allowed: list[str] | None = None) -> list[Any]:
    """``d[key]`` as a list of block names; with ``allowed``, a ConfigError unless it is exactly that list."""
    if not isinstance(d[key], list | tuple):
        raise ConfigError(f"{key} must be a list of block names, got {d[key]!r}")
    if allowed is not None and list(d[key]) != allowed:
        raise ConfigError(f"{key}={list(d[key])!r} is not supported; allowed value: {allowed!r}")
    return list(d[key])


def _attention_levels(d: dict[str, Any], kind: str, n: int) -> tuple[bool, ...]:
    """Which levels have attention, from ``down_block_types``; ``up_block_types`` must mirror it."""
    attn_down = _ATTENTION_DOWN[kind]
    down_types = block_types(d, "down_block_types")
    if len(down_types) != n:
        raise ConfigError(f"down_block_types has {len(down_types)} entries, block_out_channels has {n}")
    for t in down_types:
        check_choice("down_block_types[i]", t, ("DownBlock2D", attn_down))
    attention_levels = tuple(t == attn_down for t in down_types)
    attn_up = attn_down.replace("Down", "Up")
    expected_up = [attn_up if a else "UpBlock2D" for a in reversed(attention_levels)]
    if block_types(d, "up_block_types") != expected_up:
        raise ConfigError(
            f"up_block_types={list(d['up_block_types'])!r} must mirror down_block_types; allowed value: {expected_up!r}"
        )
    return attention_levels


def _text_only_attention(d: dict[str, Any], n: int) -> tuple[bool, ...] | None:
    """Our ``text_only_attention`` from ``only_cross_attention`` (one flag, or one per down level; up levels
    use them reversed). ``mid_block_only_cross_attention`` None means the single flag's value, or False
    beside a list; a bottleneck without self-attention is not supported."""
    value = d["only_cross_attention"]
    flags = [value] * n if isinstance(value, bool) else value
    if not isinstance(flags, list | tuple) or len(flags) != n or not all(isinstance(f, bool) for f in flags):
        raise ConfigError(f"only_cross_attention must be true, false or a list of {n} of them, got {value!r}")
    mid = d["mid_block_only_cross_attention"]
    if mid is None:
        mid = value if isinstance(value, bool) else False
    if mid is not False:
        raise ConfigError(
            f"only_cross_attention={value!r} with mid_block_only_cross_attention=None makes the mid block attend "
            "to the text only, which is not supported; allowed: mid_block_only_cross_attention false, or "
            "only_cross_attention as a list of flags"
        )
    return tuple(flags) if any(flags) else None


def _text_time_keys(c: UNetConfig) -> dict[str, Any]:
    """The reference keys of SDXL's added text/time embedding (none when ``c`` has none)."""
    if c.text_time_features is None:
        return {}
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": c.time_id_features,
        "projection_class_embeddings_input_dim": c.text_time_features,
    }


def _transformer_depth(value: Any, n: int) -> int | tuple[int, ...]:
    """``transformer_layers_per_block``: one count for every level, or one per down level (up level j uses
    entry n-1-j, the mid block the last entry, as the reference builds them)."""
    if isinstance(value, list | tuple):
        depths = tuple(_ints("transformer_layers_per_block", value))
        if len(depths) != n:
            raise ConfigError(f"transformer_layers_per_block must have one entry per level ({n}), got {value!r}")
        return depths
    return value


def _text_time(d: dict[str, Any]) -> dict[str, Any]:
    """Our ``text_time_features`` / ``time_id_features`` from ``addition_embed_type="text_time"`` (SDXL): the
    added embedding's input width ``projection_class_embeddings_input_dim`` and the sinusoid width of each
    time id ``addition_time_embed_dim``, both required then."""
    if d["addition_embed_type"] is None:
        if d["projection_class_embeddings_input_dim"] is not None:
            raise ConfigError(
                "projection_class_embeddings_input_dim is set without addition_embed_type; supported only with "
                "addition_embed_type='text_time'"
            )
        return {}
    for key in ("projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        if d[key] is None:
            raise ConfigError(f"addition_embed_type='text_time' needs {key} (an integer)")
    return {
        "text_time_features": d["projection_class_embeddings_input_dim"],
        "time_id_features": d["addition_time_embed_dim"],
    }


def _head_size(c: UNetConfig) -> int | None:
    """``UNet2DModel``'s ``attention_head_dim``: the size of one head, shared by every attention layer;
    None when each has a single head of its full width."""
    used = [level for level in range(c.levels) if c.attention_levels[level]]
    if c.mid_attention:
        used.append(c.levels - 1)
    if all(c.num_heads[level] == 1 for level in used):
        return None
    head_sizes = {c.channels[level] // c.num_heads[level] for level in used}
    if len(head_sizes) != 1:
        raise ConfigError(
            f"num_heads={c.num_heads!r} gives different head sizes {sorted(head_sizes)}; "
            "a UNet2DModel config needs one attention_head_dim"
        )
    return head_sizes.pop()


def _plain(v: Any) -> Any:
    """Lists of identical values (per-level settings) compare like their single value."""
    if isinstance(v, list | tuple) and v and all(x == v[0] for x in v):
        return v[0]
    return v


def _ints(name: str, values: Any) -> list[int]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{name} must be a list of integers, got {values!r}")
    return list(values)


def _same(name: str, value: Any, n: int) -> Any:
    """A per-level setting we support only as one value for all levels."""
    if isinstance(value, list | tuple):
        if len(value) != n or any(v != value[0] for v in value):
            raise ConfigError(f"{name}={value!r}: only one value shared by all levels is supported")
        return value[0]
    return value
