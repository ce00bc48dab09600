"""UNet: parity with the reference fixtures, config translation, input validation, loading and saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.diffusers_keys import from_diffusers_state_dict, to_diffusers_state_dict
from diffusekit.io.models import WEIGHTS_NAME, load_unet, save_unet
from diffusekit.io.weights import save_weights
from diffusekit.networks.embeddings import timestep_embedding
from diffusekit.networks.unet import UNET_PRESETS, UNet

ATOL = 1e-4  # fixtures README section 1: single model forward passes


def _io(fixtures_dir: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "models" / case / "io.safetensors"))


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    print(f"{name}: max abs error {err:.2e} (|want| max {want.abs().max().item():.2f})")
    assert got.shape == want.shape
    assert err < ATOL


# ---- parity ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_parity_unet2d(fixtures_dir: Path) -> None:
    model = load_unet(fixtures_dir / "models/unet2d/model")
    io = _io(fixtures_dir, "unet2d")
    _close("unet2d out", model(io["sample"], io["timestep"]), io["out"])
    _close(
        "unet2d out_timestep_scalar", model(io["sample"], io["timestep_scalar"]), io["out_timestep_scalar"]
    )


@torch.no_grad()
def test_parity_unet2d_class_conditional(fixtures_dir: Path) -> None:
    model = load_unet(fixtures_dir / "models/unet2d_class_conditional/model")
    io = _io(fixtures_dir, "unet2d_class_conditional")
    out = model(io["sample"], io["timestep"], class_labels=io["class_labels"])
    _close("unet2d_class_conditional out", out, io["out"])
    # the labels matter: other labels give another output
    other = model(io["sample"], io["timestep"], class_labels=(io["class_labels"] + 1) % 10)
    assert (other - out).abs().max() > 1e-2


@torch.no_grad()
def test_parity_unet2d_condition(fixtures_dir: Path) -> None:
    model = load_unet(fixtures_dir / "models/unet2d_condition/model")
    io = _io(fixtures_dir, "unet2d_condition")
    _close(
        "unet2d_condition out",
        model(io["sample"], io["timestep"], context=io["encoder_hidden_states"]),
        io["out"],
    )
    out = model(
        io["sample_nonsquare"], io["timestep_nonsquare"], context=io["encoder_hidden_states_nonsquare"]
    )
    _close("unet2d_condition out_nonsquare", out, io["out_nonsquare"])


@torch.no_grad()
def test_inpaint_unet_nine_channels(fixtures_dir: Path) -> None:
    model = load_unet(fixtures_dir / "pipelines/stable_diffusion_inpaint/unet")
    assert model.config.in_channels == 9 and model.config.out_channels == 4
    g = torch.Generator().manual_seed(0)
    latents, extra = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    out = model(torch.cat([latents, extra], dim=1), torch.tensor([999, 1]), context=context)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    # `concat` stacks the extra channels after x: the same result
    torch.testing.assert_close(model(latents, torch.tensor([999, 1]), context=context, concat=extra), out)


# ---- timestep embedding ----------------------------------------------------------------------------------


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 1.0, 999.0, 12.5])
    dim, shift = 8, 1
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / (4 - shift))
    a = t[:, None] * freqs[None]
    torch.testing.assert_close(
        timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=shift), torch.cat([a.sin(), a.cos()], 1)
    )
    torch.testing.assert_close(
        timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=shift), torch.cat([a.cos(), a.sin()], 1)
    )


@torch.no_grad()
def test_fractional_and_scalar_timesteps() -> None:
    model = UNet(UNET_PRESETS["tiny"]).eval()
    _randomize(model)
    x = torch.randn(2, 3, 16, 16)
    # 0-d tensor, python number and (B,) tensor agree
    ref = model(x, torch.tensor([7, 7]))
    torch.testing.assert_close(model(x, torch.tensor(7)), ref)
    torch.testing.assert_close(model(x, 7), ref)
    # fractional timesteps are not rounded
    frac = model(x, torch.tensor(7.4))
    assert (frac - ref).abs().max() > 1e-5
    assert (frac - model(x, 7.6)).abs().max() > 1e-5


def _randomize(model: torch.nn.Module) -> None:
    """Fresh models start with zeroed residual outputs; perturb every weight so all paths matter."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=g)


# ---- presets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "millions"), [("ddpm-cifar10", 35.7), ("sd15", 859.5), ("sd2", 865.9)])
def test_preset_parameter_counts(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = UNet(UNET_PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


# ---- input validation -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_unet() -> UNet:
    return UNet(UNET_PRESETS["tiny-text"]).eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(x=torch.zeros(1, 3, 8, 8)), "4 input channels"),
        (dict(x=torch.zeros(1, 4, 9, 8)), "multiples of 2"),
        (dict(x=torch.zeros(4, 8, 8)), "x must be"),
        (dict(context=None), "context is required"),
        (dict(context=torch.zeros(1, 7, 16)), "cross_attention_dim=32"),
        (dict(context=torch.zeros(2, 7, 32)), r"context must be a \(1, L, 32\)"),
        (dict(t=torch.zeros(3)), "t must be"),
        (dict(class_labels=torch.zeros(1, dtype=torch.long)), "not class-conditional"),
        (dict(concat=torch.zeros(1, 5, 4, 4)), "concat must be"),
    ],
)
def test_bad_inputs_name_the_argument(text_unet: UNet, kwargs: dict, match: str) -> None:
    args = dict(x=torch.zeros(1, 4, 8, 8), t=torch.tensor(1), context=torch.zeros(1, 7, 32))
    args.update(kwargs)
    x, t = args.pop("x"), args.pop("t")
    with pytest.raises(ConfigError, match=match):
        text_unet(x, t, **args)


def test_bad_class_labels(fixtures_dir: Path) -> None:
    model = load_unet(fixtures_dir / "models/unet2d_class_conditional/model")
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ConfigError, match="class_labels is required"):
        model(x, 1)
    with pytest.raises(ConfigError, match=r"class_labels must be in \[0, 9\]"):
        model(x, 1, class_labels=torch.tensor([0, 10]))
    with pytest.raises(ConfigError, match="class_labels must be an integer"):
        model(x, 1, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ConfigError, match="context was given"):
        model(x, 1, class_labels=torch.tensor([0, 1]), context=torch.zeros(2, 3, 4))


# ---- loading and saving ----------------------------------------------------------------------------------


@torch.no_grad()
def test_save_load_round_trip(fixtures_dir: Path, tmp_path: Path) -> None:
    model = load_unet(fixtures_dir / "models/unet2d_condition/model")
    save_unet(model, tmp_path / "unet")
    again = load_unet(tmp_path / "unet")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # the saved file has exactly the reference's names and tensors
    ref = load_file(str(fixtures_dir / "models/unet2d_condition/model" / WEIGHTS_NAME))
    saved = load_file(str(tmp_path / "unet" / WEIGHTS_NAME))
    assert saved.keys() == ref.keys() and all(torch.equal(saved[k], ref[k]) for k in ref)


def test_fresh_model_round_trip(tmp_path: Path) -> None:
    model = UNet(UNET_PRESETS["tiny"])
    _randomize(model)
    save_unet(model, tmp_path / "m")
    again = load_unet(tmp_path / "m")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x, 3), model.eval()(x, 3), rtol=0, atol=0)


def _copy_fixture(fixtures_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "unet"
    shutil.copytree(fixtures_dir / "models/unet2d/model", dst)
    return dst


def test_missing_weight_file(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy_fixture(fixtures_dir, tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(WeightsError, match=WEIGHTS_NAME):
        load_unet(folder)


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_unet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        load_unet(tmp_path / "empty")


def test_truncated_weight_file(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy_fixture(fixtures_dir, tmp_path)
    path = folder / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=WEIGHTS_NAME):
        load_unet(folder)


def test_config_does_not_match_weights(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy_fixture(fixtures_dir, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "block_out_channels": [16, 48]}))
    with pytest.raises(WeightsError) as info:
        load_unet(folder)
    msg = str(info.value)
    assert WEIGHTS_NAME in msg and "config.json" in msg and "shape mismatches" in msg
    (folder / "config.json").write_text(json.dumps({**raw, "layers_per_block": 1}))
    with pytest.raises(WeightsError, match="unexpected keys: down_blocks"):
        load_unet(folder)


def test_missing_and_unexpected_keys(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy_fixture(fixtures_dir, tmp_path)
    state = load_file(str(folder / WEIGHTS_NAME))
    del state["conv_in.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_weights(state, folder / WEIGHTS_NAME)
    with pytest.raises(WeightsError) as info:
        load_unet(folder)
    msg = str(info.value)
    assert "missing keys: conv_in.weight" in msg and "unexpected keys: extra.weight" in msg


def test_invalid_config_names_the_file(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = _copy_fixture(fixtures_dir, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "time_embedding_type": "fourier"}))
    with pytest.raises(ConfigError) as info:
        load_unet(folder)
    assert "config.json" in str(info.value) and "time_embedding_type" in str(info.value)


def test_legacy_attention_names_are_renamed() -> None:
    state = {
        "mid_block.attentions.0.query.weight": torch.zeros(8, 8, 1, 1),
        "mid_block.attentions.0.proj_attn.bias": torch.zeros(8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
        "conv_in.weight": torch.zeros(8, 3, 3, 3),
    }
    out = from_diffusers_state_dict(state)
    assert out["mid_block.attentions.0.to_q.weight"].shape == (8, 8)
    assert "mid_block.attentions.0.to_out.0.bias" in out
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in out
    assert out["conv_in.weight"].shape == (8, 3, 3, 3)
    assert to_diffusers_state_dict(out).keys() == out.keys()
