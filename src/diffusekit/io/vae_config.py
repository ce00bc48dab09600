"""The reference's (diffusers) ``AutoencoderKL`` ``config.json`` <-> our :class:`VAEConfig`.

Unknown keys are ignored; keys for features we do not implement must hold the reference's default, so a
config we cannot run is refused with the key and the allowed values named.
"""

from __future__ import annotations

from typing import Any

from diffusekit.errors import ConfigError, check_choice
from diffusekit.io.unet_config import block_types, first_size
from diffusekit.limits import MAX_LEVELS, check_flag, check_float, check_int, translating
from diffusekit.networks.vae import VAEConfig

# our field names -> the reference config.json keys they come from (for error messages)
_FILE_KEYS = {"channels": "block_out_channels", "norm_groups": "norm_num_groups"}

# The reference's defaults for keys missing from a config.json.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@translating("VAE config", names=_FILE_KEYS)
def vae_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    """Translate a reference ``AutoencoderKL`` ``config.json`` dict (unknown keys ignored; values we
    do not implement raise ConfigError naming the key and the allowed values)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a VAE config must be a JSON object, got {type(d).__name__}")
    check_choice("_class_name", d.get("_class_name", "AutoencoderKL"), ("AutoencoderKL",))
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    check_choice("act_fn", d["act_fn"], ("silu",))
    for key in ("latents_mean", "latents_std"):
        check_choice(key, d[key], (None,))
    channels = d["block_out_channels"]
    if not isinstance(channels, list | tuple):
        raise ConfigError(f"block_out_channels must be a list of integers, got {channels!r}")
    n = check_int("len(block_out_channels)", len(channels), 1, MAX_LEVELS)
    block_types(d, "down_block_types", ["DownEncoderBlock2D"] * n)
    block_types(d, "up_block_types", ["UpDecoderBlock2D"] * n)
    shift = d["shift_factor"]
    return VAEConfig(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        latent_channels=d["latent_channels"],
        channels=tuple(channels),
        layers_per_block=d["layers_per_block"],
        norm_groups=d["norm_num_groups"],
        mid_attention=check_flag("mid_block_add_attention", d["mid_block_add_attention"]),
        use_quant_conv=check_flag("use_quant_conv", d["use_quant_conv"]),
        use_post_quant_conv=check_flag("use_post_quant_conv", d["use_post_quant_conv"]),
        scaling_factor=check_float("scaling_factor", d["scaling_factor"], 0.0, 1e6, open_low=True),
        shift_factor=None if shift is None else check_float("shift_factor", shift, -1e6, 1e6),
        sample_size=first_size(d["sample_size"]),
    )


def vae_to_diffusers(c: VAEConfig) -> dict[str, Any]:
    """The reference ``AutoencoderKL`` ``config.json`` for ``c``."""
    n = len(c.channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(c.channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": c.in_channels,
        "latent_channels": c.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": c.layers_per_block,
        "mid_block_add_attention": c.mid_attention,
        "norm_num_groups": c.norm_groups,
        "out_channels": c.out_channels,
        "sample_size": c.sample_size,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": c.use_post_quant_conv,
        "use_quant_conv": c.use_quant_conv,
    }
