"""The reference's config.json <-> our network configs (io.unet_config, io.vae_config, io.text_encoder_config):
round trips through the reference fixtures' own files, head-count semantics, refusals that name the file's keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusekit.errors import ConfigError
from diffusekit.io.text_encoder_config import text_encoder_from_diffusers, text_encoder_to_diffusers
from diffusekit.io.unet_config import unet_from_diffusers, unet_to_diffusers
from diffusekit.io.vae_config import vae_from_diffusers, vae_to_diffusers
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS, TextEncoderConfig
from diffusekit.networks.unet import UNET_PRESETS, UNet, UNetConfig
from diffusekit.networks.vae import VAE_PRESETS, VAEConfig


def _raw(fixtures_dir: Path, folder: str) -> dict:
    return json.loads((fixtures_dir / folder / "config.json").read_text())


# ---- U-Net ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder",
    [
        "models/unet2d/model",
        "models/unet2d_class_conditional/model",
        "models/unet2d_condition/model",
        "pipelines/stable_diffusion_inpaint/unet",
    ],
)
def test_unet_round_trip_through_reference_format(fixtures_dir: Path, folder: str) -> None:
    raw = _raw(fixtures_dir, folder)
    config = unet_from_diffusers(raw)
    assert unet_from_diffusers(unet_to_diffusers(config)) == config
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    written = unet_to_diffusers(config)
    assert written["_class_name"] == raw["_class_name"]
    for key, value in raw.items():  # every key we write agrees with the reference's own file
        if key in written and not key.startswith("_"):
            assert written[key] == value, key


def test_head_count_semantics(fixtures_dir: Path) -> None:
    # UNet2DModel: attention_head_dim = size of one head -> 32 channels / 8 = 4 heads
    assert unet_from_diffusers(_raw(fixtures_dir, "models/unet2d/model")).num_heads[1] == 4
    # UNet2DConditionModel: attention_head_dim = NUMBER of heads
    raw = _raw(fixtures_dir, "models/unet2d_condition/model")
    assert unet_from_diffusers(raw).num_heads == (2, 2)
    # ... unless num_attention_heads is set, which takes precedence
    assert unet_from_diffusers({**raw, "num_attention_heads": [4, 8]}).num_heads == (4, 8)
    assert unet_to_diffusers(UNET_PRESETS["sd15"])["attention_head_dim"] == 8
    model = UNet(UNET_PRESETS["tiny-text"])
    assert model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2


def test_unet2d_head_size_must_be_shared() -> None:
    """UNet2DModel has one attention_head_dim, a head SIZE shared by every attention layer."""
    shared = UNetConfig(channels=(16, 32), attention_levels=(True, True), num_heads=(2, 4), norm_groups=8)
    assert unet_to_diffusers(shared)["attention_head_dim"] == 8
    assert unet_from_diffusers(unet_to_diffusers(shared)) == shared
    differ = UNetConfig(channels=(16, 32), attention_levels=(True, True), num_heads=(2, 2), norm_groups=8)
    with pytest.raises(ConfigError, match="one attention_head_dim"):  # head sizes 8 and 16
        unet_to_diffusers(differ)


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_unet_presets_round_trip(name: str) -> None:
    config = UNET_PRESETS[name]
    assert unet_from_diffusers(unet_to_diffusers(config)) == config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("addition_embed_type", "text_image"),  # "text_time" (SDXL) is supported
    ],
)
def test_unsupported_reference_values_are_named(fixtures_dir: Path, key: str, value: object) -> None:
    raw = _raw(fixtures_dir, "models/unet2d_condition/model")
    with pytest.raises(ConfigError) as info:
        unet_from_diffusers({**raw, key: value, "some_future_key": 1})  # unknown keys are ignored
    assert key.rstrip("s") in str(info.value) and "allowed" in str(info.value)


def test_up_blocks_must_mirror_down_blocks(fixtures_dir: Path) -> None:
    raw = _raw(fixtures_dir, "models/unet2d_condition/model")
    with pytest.raises(ConfigError, match="up_block_types"):
        unet_from_diffusers({**raw, "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]})


@pytest.mark.parametrize(
    ("key", "value", "file_key"),
    [
        ("block_out_channels", [64, -1], "block_out_channels[1]"),
        ("norm_num_groups", 0, "norm_num_groups"),
        ("transformer_layers_per_block", 10**9, "transformer_layers_per_block"),
        ("num_class_embeds", 0, "num_class_embeds"),
        ("attention_head_dim", [2, 0], "attention_head_dim[1]"),
    ],
)
def test_unet_refusals_name_the_files_key(fixtures_dir: Path, key: str, value: object, file_key: str) -> None:
    """The config's own checks name our fields; the translation renames them to the keys of the file."""
    raw = _raw(fixtures_dir, "models/unet2d_condition/model")
    with pytest.raises(ConfigError) as info:
        unet_from_diffusers({**raw, key: value})
    assert file_key in str(info.value)


# ---- VAE -----------------------------------------------------------------------------------------------------


def test_vae_round_trip(fixtures_dir: Path) -> None:
    raw = _raw(fixtures_dir, "models/vae/model")
    config = vae_from_diffusers(raw)
    assert config.scaling_factor == 0.18215 and config.downsample_factor == 2
    assert vae_from_diffusers(vae_to_diffusers(config)) == config
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    written = vae_to_diffusers(config)
    for key, value in raw.items():
        if key in written and not key.startswith("_"):
            assert written[key] == value, key
    with pytest.raises(ConfigError, match="down_block_types"):
        vae_from_diffusers({**raw, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ConfigError, match="act_fn"):
        vae_from_diffusers({**raw, "act_fn": "relu"})
    with pytest.raises(ConfigError, match=r"block_out_channels\[0\]"):
        vae_from_diffusers({**raw, "block_out_channels": [0, 32]})
    assert all(vae_from_diffusers(vae_to_diffusers(c)) == c for c in VAE_PRESETS.values())


# ---- text encoder --------------------------------------------------------------------------------------------


def test_text_encoder_from_diffusers_json(fixtures_dir: Path) -> None:
    config = text_encoder_from_diffusers(_raw(fixtures_dir, "models/text_encoder/model"))
    assert config == TextEncoderConfig(
        vocab_size=740, hidden_size=32, num_layers=2, num_heads=4, mlp_size=37, max_positions=77,
        activation="quick_gelu", layer_norm_eps=1e-5, bos_id=738, eos_id=739, pad_id=739,
    )  # fmt: skip
    assert text_encoder_from_diffusers(text_encoder_to_diffusers(config)) == config
    assert all(text_encoder_from_diffusers(text_encoder_to_diffusers(c)) == c for c in TEXT_ENCODER_PRESETS.values())


def test_legacy_special_ids_are_translated() -> None:
    sd1_json = {
        "vocab_size": 49408, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 768, "whatever": [1],
    }  # fmt: skip
    assert text_encoder_from_diffusers(sd1_json) == TEXT_ENCODER_PRESETS["sd1"]
    nested = text_encoder_from_diffusers({"model_type": "clip", "text_config": sd1_json})
    assert nested == TEXT_ENCODER_PRESETS["sd1"]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("hidden_act", "relu", "hidden_act.*quick_gelu"),
        ("num_attention_heads", 5, "divisible by num_attention_heads=5"),
        ("num_hidden_layers", 0, "num_hidden_layers"),
        ("intermediate_size", 10**9, "intermediate_size"),
        ("eos_token_id", 5000, "eos_token_id"),
        ("vocab_size", None, "vocab_size"),
    ],
)
def test_text_encoder_refusals_name_the_files_key(fixtures_dir: Path, key: str, value: object, match: str) -> None:
    config = _raw(fixtures_dir, "models/text_encoder/model")
    if value is None:
        del config[key]
    else:
        config[key] = value
    with pytest.raises(ConfigError, match=match):
        text_encoder_from_diffusers(config)
