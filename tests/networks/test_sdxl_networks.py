"""The SDXL parts of the networks: the U-Net's added text/time embedding and per-level transformer depth, and the
projection-headed text encoder, with their reference config translation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.errors import ConfigError
from diffusekit.io.models import load_unet
from diffusekit.io.text import load_text_encoder, save_text_encoder
from diffusekit.io.text_encoder_config import text_encoder_from_diffusers, text_encoder_to_diffusers
from diffusekit.io.unet_config import unet_from_diffusers, unet_to_diffusers
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNet, UNetConfig

TINY_XL = UNetConfig(
    in_channels=4, out_channels=4, channels=(16, 32), layers_per_block=1, attention_levels=(False, True),
    num_heads=(2, 4), cross_attention_dim=24, transformer_depth=(1, 3), use_linear_projection=True,
    text_time_features=8 + 6 * 4, time_id_features=4, norm_groups=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_xl"


def _call(unet: UNet, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    return unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), context=torch.randn(2, 5, 24), **kw)


def test_unet_text_time_matches_the_reference_first_call(sdxl_dir, fixtures_dir):
    """One U-Net call of the SDXL case: context, pooled text and time ids as the reference gave them."""
    ref = load_file(fixtures_dir / "pipelines/cases/sdxl_t2i_microcond_euler_cfg5/io.safetensors")
    unet = load_unet(sdxl_dir / "unet")
    context = torch.cat([ref["negative_prompt_embeds"], ref["prompt_embeds"]])
    with torch.no_grad():
        out = unet(ref["unet_sample_in"][0], ref["unet_timestep"][0], context=context,
                   pooled=ref["add_text_embeds"], time_ids=ref["add_time_ids"])  # fmt: skip
    torch.testing.assert_close(out, ref["unet_out"][0], rtol=1e-4, atol=1e-4)


def test_transformer_depth_per_level_builds_that_many_blocks():
    unet = UNet(TINY_XL)
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 3
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 3  # the last level's depth
    assert [len(a.transformer_blocks) for a in unet.up_blocks[0].attentions] == [3, 3]  # up level 0 = level 1
    assert unet.up_blocks[1].attentions is None or len(unet.up_blocks[1].attentions) == 0
    with pytest.raises(ConfigError, match="transformer_depth must be one number or one per level"):
        dataclasses.replace(TINY_XL, transformer_depth=(1, 2, 3))
    with pytest.raises(ConfigError, match=r"transformer_depth\[1\]"):
        dataclasses.replace(TINY_XL, transformer_depth=(1, 0))


def test_added_embedding_uses_pooled_text_and_every_time_id():
    torch.manual_seed(1)
    unet = UNet(TINY_XL).eval()
    with torch.no_grad():  # conv_out starts at zero: perturb every weight so the output depends on the input
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pooled, ids = torch.randn(2, 8), torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    with torch.no_grad():
        base = _call(unet, pooled=pooled, time_ids=ids)
        other_crop = ids.clone()
        other_crop[:, 3] = 8
        assert not torch.allclose(base, _call(unet, pooled=pooled, time_ids=other_crop))
        assert not torch.allclose(base, _call(unet, pooled=pooled + 1, time_ids=ids))
        torch.testing.assert_close(base, _call(unet, pooled=pooled, time_ids=ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"time_ids": torch.zeros(2, 6)}, "pooled is required"),
        ({"pooled": torch.zeros(2, 8)}, "time_ids is required"),
        ({"pooled": torch.zeros(2, 8), "time_ids": torch.zeros(2, 5)}, "give 28 features; .* is 32"),
        ({"pooled": torch.zeros(3, 8), "time_ids": torch.zeros(2, 6)}, r"pooled must be a floating-point \(2, N\)"),
        ({"pooled": torch.zeros(2, 8), "time_ids": torch.zeros(2, 6, dtype=torch.long)}, "time_ids must be"),
    ],
)
def test_added_embedding_inputs_are_checked_by_name(kw, message):
    with pytest.raises(ConfigError, match=message):
        _call(UNet(TINY_XL), **kw)


def test_a_unet_without_added_embedding_refuses_pooled_text():
    plain = UNet(dataclasses.replace(TINY_XL, text_time_features=None, time_id_features=None))
    with pytest.raises(ConfigError, match="no added text/time embedding"):
        _call(plain, pooled=torch.zeros(2, 8), time_ids=torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="must be given together"):
        dataclasses.replace(TINY_XL, time_id_features=None)


def test_text_time_config_round_trips_through_the_reference_keys(sdxl_dir):
    raw = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    config = unet_from_diffusers(raw)
    assert (config.text_time_features, config.time_id_features, config.transformer_depth) == (72, 8, (1, 2))
    written = unet_to_diffusers(config)
    assert written["addition_embed_type"] == "text_time"
    assert written["projection_class_embeddings_input_dim"] == 72 and written["addition_time_embed_dim"] == 8
    assert written["transformer_layers_per_block"] == [1, 2]
    assert unet_from_diffusers(written) == config
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="needs projection_class_embeddings_input_dim"):
        unet_from_diffusers({**raw, "projection_class_embeddings_input_dim": None})


def test_projection_headed_encoder_matches_the_reference_pooled_embedding(sdxl_dir, fixtures_dir):
    ref = load_file(fixtures_dir / "pipelines/cases/sdxl_t2i_euler_cfg5/io.safetensors")
    enc = load_text_encoder(sdxl_dir / "text_encoder_2")
    assert enc.config.projection_dim == 24 and enc.config.pad_id == 0
    with torch.no_grad():
        out = enc(ref["prompt_input_ids_2"])
    torch.testing.assert_close(out.text_embeds, ref["pooled_prompt_embeds"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.hidden_states[-2], ref["prompt_embeds"][..., 32:], rtol=1e-4, atol=1e-4)


def test_projection_is_read_only_for_the_projection_headed_class(sdxl_dir, tmp_path):
    raw = json.loads((sdxl_dir / "text_encoder_2" / "config.json").read_text())
    assert text_encoder_from_diffusers({**raw, "architectures": ["CLIPTextModel"]}).projection_dim is None
    with pytest.raises(ConfigError, match="projection_dim"):
        text_encoder_from_diffusers({k: v for k, v in raw.items() if k != "projection_dim"})
    # written and read back: config, and text_projection.weight outside the text_model. prefix
    enc = ClipTextEncoder(TextEncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, mlp_size=20,
                                            bos_id=48, eos_id=49, pad_id=0, projection_dim=6))  # fmt: skip
    assert enc.text_projection.bias is None
    save_text_encoder(enc, tmp_path / "te2")
    assert "text_projection.weight" in load_file(tmp_path / "te2" / "model.safetensors")
    assert text_encoder_to_diffusers(enc.config)["architectures"] == ["CLIPTextModelWithProjection"]
    back = load_text_encoder(tmp_path / "te2")
    assert back.config == enc.config
    torch.testing.assert_close(back.text_projection.weight, enc.text_projection.weight, rtol=0, atol=0)
