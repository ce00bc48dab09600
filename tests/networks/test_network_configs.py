"""Our own network configs validate themselves: every size against ``diffusekit.limits`` when the config is
built (however it is built), with messages naming OUR fields; networks/ holds no foreign-format translation."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import diffusekit.networks
from diffusekit.errors import ConfigError
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS, TextEncoderConfig
from diffusekit.networks.unet import UNET_PRESETS, UNetConfig
from diffusekit.networks.vae import VAE_PRESETS, VAEConfig

TINY_UNET = UNET_PRESETS["tiny"]  # channels (16, 32), norm_groups 8
TINY_VAE = VAE_PRESETS["tiny"]
TINY_TEXT = TEXT_ENCODER_PRESETS["tiny"]
HUGE = 2**20 * 8  # a multiple of every norm-group count and head count used here, beyond MAX_WIDTH


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(channels=(16, HUGE)), "channels[1]"),
        (dict(in_channels=HUGE), "in_channels"),
        (dict(layers_per_block=10**6), "layers_per_block"),
        (dict(transformer_depth=10**6), "transformer_depth"),
        (dict(num_classes=10**12), "num_classes"),
        (dict(sample_size=10**9), "sample_size"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(norm_eps=float("inf")), "norm_eps"),
        (dict(channels=(16, "32")), "channels[1]"),
    ],
)
def test_unet_config_refuses_sizes_beyond_the_limits_when_built(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(TINY_UNET, **changes)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(channels=(16, HUGE)), "channels[1]"),
        (dict(latent_channels=HUGE), "latent_channels"),
        (dict(layers_per_block=10**6), "layers_per_block"),
        (dict(scaling_factor=float("nan")), "scaling_factor"),
        (dict(channels=()), "number of levels (channels)"),
    ],
)
def test_vae_config_refuses_sizes_beyond_the_limits_when_built(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(TINY_VAE, **changes)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(vocab_size=10**12), "vocab_size"),
        (dict(hidden_size=HUGE, num_heads=4), "hidden_size"),
        (dict(num_layers=10**6), "num_layers"),
        (dict(max_positions=10**9), "max_positions"),
    ],
)
def test_text_encoder_config_refuses_sizes_beyond_the_limits_when_built(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(TINY_TEXT, **changes)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    ("config", "changes", "field"),
    [
        (TINY_UNET, {"channels": [16, HUGE]}, "channels[1]"),
        (TINY_VAE, {"channels": [16, HUGE]}, "channels[1]"),
        (TINY_TEXT, {"num_layers": 10**6}, "num_layers"),
    ],
)
def test_our_own_saved_form_is_checked_under_our_own_names(config, changes: dict, field: str) -> None:
    """A config saved by us (``to_dict``) names its fields as we do: an error must name them that way too."""
    cls = type(config)
    assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError) as info:
        cls.from_dict({**config.to_dict(), **changes})
    assert str(info.value).startswith(field)
    with pytest.raises(ConfigError, match=r"unknown \w+Config keys \['block_out_channels'\]"):
        cls.from_dict({**config.to_dict(), "block_out_channels": [16]})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        cls.from_dict([1, 2])


def test_presets_are_within_the_limits() -> None:
    for presets in (UNET_PRESETS, VAE_PRESETS, TEXT_ENCODER_PRESETS):
        for config in presets.values():
            assert dataclasses.replace(config) == config


def test_networks_hold_no_foreign_format_translation() -> None:
    """The reference's config formats are read and written in io/ only (one verb, ``*_from_diffusers`` /
    ``*_to_diffusers``); networks/ defines networks and our own configs."""
    folder = Path(diffusekit.networks.__file__).parent
    verbs = re.compile(r"def (\w*from_diffusers|\w*to_diffusers|from_hf|to_hf|from_reference)\b")
    found = [f"{p.name}: {m.group(1)}" for p in sorted(folder.glob("*.py")) for m in verbs.finditer(p.read_text())]
    assert not found, found
    for cls in (UNetConfig, VAEConfig, TextEncoderConfig):
        assert not any(hasattr(cls, name) for name in ("from_diffusers", "to_diffusers", "from_hf", "to_hf"))
