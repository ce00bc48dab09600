"""VAE: parity with the reference fixture, the posterior, tiled encode/decode, loading and saving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.models import WEIGHTS_NAME, load_vae, save_vae
from diffusekit.networks.vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, tiled_map

ATOL = 1e-4  # fixtures README section 1: single model forward passes


@pytest.fixture(scope="module")
def vae(fixtures_dir: Path) -> AutoencoderKL:
    return load_vae(fixtures_dir / "models/vae/model")


@pytest.fixture(scope="module")
def io(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "models/vae/io.safetensors"))


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    print(f"vae {name}: max abs error {err:.2e}")
    assert got.shape == want.shape
    assert err < ATOL


# ---- parity ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_parity_encode(vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    posterior = vae.encode(io["image"])
    _close("posterior_parameters", posterior.parameters, io["posterior_parameters"])
    _close("latent_mean", posterior.mean, io["latent_mean"])
    _close("latent_logvar", posterior.logvar, io["latent_logvar"])
    _close("latent_std", posterior.std, io["latent_std"])
    _close("latent_sample", posterior.sample(noise=io["posterior_noise"]), io["latent_sample"])


@torch.no_grad()
def test_parity_decode(vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    _close("decoded", vae.decode(io["z"]), io["decoded"])
    _close("reconstruction_from_mean", vae.decode(io["latent_mean"]), io["reconstruction_from_mean"])
    # the forward does not apply the scaling factor: it is stored only
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(vae(io["image"]), io["reconstruction_from_mean"], atol=ATOL, rtol=0)


# ---- posterior --------------------------------------------------------------------------------------------


def test_posterior_clamps_logvar_but_keeps_parameters() -> None:
    params = torch.cat(
        [torch.zeros(1, 2, 2, 2), torch.tensor([-50.0, 25.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1
    )
    p = DiagonalGaussian(params)
    assert p.logvar[0, 0].eq(-30).all() and p.logvar[0, 1].eq(20).all()
    torch.testing.assert_close(p.std, torch.exp(0.5 * p.logvar))
    assert p.parameters is params  # raw, unclamped


def test_posterior_sample_and_kl() -> None:
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    p = DiagonalGaussian(torch.cat([mean, logvar], 1))
    draw = p.sample(generator=torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(draw, mean + torch.exp(0.5 * logvar) * noise)
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0  # N(0, I) has no KL to itself
    with pytest.raises(ConfigError, match="noise"):
        p.sample(noise=torch.zeros(1, 4, 3, 3))


# ---- tiling ------------------------------------------------------------------------------------------------


def test_tiled_map_reproduces_a_pointwise_map_exactly() -> None:
    x = torch.randn(2, 3, 37, 50)

    def up(t: torch.Tensor) -> torch.Tensor:  # each output pixel depends on one input pixel
        return 3 * t.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3) + 1

    torch.testing.assert_close(tiled_map(up, x, tile=16, overlap=6, up=4), up(x), atol=1e-6, rtol=1e-6)
    y = torch.randn(1, 2, 48, 40)
    sub = tiled_map(lambda t: t[:, :, ::4, ::4], y, tile=16, overlap=8, down=4)
    torch.testing.assert_close(sub, y[:, :, ::4, ::4], atol=1e-6, rtol=0)


def test_tiled_map_blends_seams_linearly() -> None:
    calls = []

    def offset(t: torch.Tensor, up: int = 1) -> torch.Tensor:  # each tile adds its own constant
        calls.append(None)
        return t.repeat_interleave(up, dim=2).repeat_interleave(up, dim=3) + float(len(calls) - 1)

    # one row of three tiles [0, 8), [4, 12), [8, 16), overlaps of 4: exact linear ramps between them
    out = tiled_map(offset, torch.zeros(1, 1, 8, 16), tile=8, overlap=4)[0, 0, 0]
    want = torch.tensor([0, 0, 0, 0, 0.125, 0.375, 0.625, 0.875, 1.125, 1.375, 1.625, 1.875, 2, 2, 2, 2])
    torch.testing.assert_close(out, want)
    # a 2-D grid of 3x3 tiles (offsets 0..8, the last ones end-aligned): no step anywhere is larger than
    # the total offset spread over the 16-pixel blend ramp, whereas an unblended seam jumps by >= 1
    calls.clear()
    out = tiled_map(lambda t: offset(t, up=4), torch.zeros(1, 1, 14, 14), tile=8, overlap=4, up=4)
    assert len(calls) == 9
    steps = max(out.diff(dim=2).abs().max().item(), out.diff(dim=3).abs().max().item())
    assert steps <= 8 / 16 + 1e-6


@torch.no_grad()
def test_tiled_decode_matches_untiled(vae: AutoencoderKL) -> None:
    # Tiling is an approximation: GroupNorm statistics and the mid-block attention become per-tile and
    # tile borders see zero padding. On this random-weight VAE (decoded |x| ~ 0.36 on average, up to ~2.5)
    # a 48x48 latent in 32x32 tiles overlapping by 16 stays within 0.3 max / 0.04 mean abs error, and
    # blending the overlaps is much better than butting tiles together.
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    full = vae.decode(z)
    tiled = vae.decode(z, tile=32, tile_overlap=16)
    butted = vae.decode(z, tile=16, tile_overlap=0)
    err, mean_err = (tiled - full).abs().max().item(), (tiled - full).abs().mean().item()
    butted_err = (butted - full).abs().mean().item()
    print(
        f"vae tiled decode: max abs {err:.3f}, mean abs {mean_err:.4f} (no-overlap tiles: {butted_err:.4f})"
    )
    assert tiled.shape == full.shape
    assert err < 0.3 and mean_err < 0.04
    assert mean_err < 0.5 * butted_err


@torch.no_grad()
def test_tiled_encode_matches_untiled(vae: AutoencoderKL) -> None:
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = vae.encode(x).parameters
    tiled = vae.encode(x, tile=64, tile_overlap=32).parameters
    err, mean_err = (tiled - full).abs().max().item(), (tiled - full).abs().mean().item()
    print(f"vae tiled encode: max abs {err:.3f}, mean abs {mean_err:.4f}")
    assert tiled.shape == full.shape
    assert err < 0.3 and mean_err < 0.04


def test_small_input_is_a_single_tile(vae: AutoencoderKL, io: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(io["z"], tile=64), vae.decode(io["z"]), atol=1e-6, rtol=0)


def test_bad_tile_arguments(vae: AutoencoderKL) -> None:
    z = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ConfigError, match="tile_overlap"):
        vae.decode(z, tile=4, tile_overlap=4)
    with pytest.raises(ConfigError, match="tile must be"):
        vae.encode(torch.zeros(1, 3, 8, 8), tile=7)


# ---- input validation --------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument(vae: AutoencoderKL) -> None:
    with pytest.raises(ConfigError, match=r"x must be a \(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ConfigError, match=r"z must be a \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


# ---- config ------------------------------------------------------------------------------------------------


def test_sd_preset_parameter_count() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS["sd"])
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(83.65, abs=0.01)
    assert VAE_PRESETS["sd"].downsample_factor == 8


# ---- loading and saving ------------------------------------------------------------------------------------


@torch.no_grad()
def test_save_load_round_trip(vae: AutoencoderKL, fixtures_dir: Path, tmp_path: Path) -> None:
    save_vae(vae, tmp_path / "vae")
    again = load_vae(tmp_path / "vae")
    assert again.config == vae.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in vae.state_dict().items())
    ref = load_file(str(fixtures_dir / "models/vae/model" / WEIGHTS_NAME))
    saved = load_file(str(tmp_path / "vae" / WEIGHTS_NAME))
    assert saved.keys() == ref.keys()
    # a pipeline folder works too (its vae/ subfolder is used)
    assert load_vae(fixtures_dir / "pipelines/stable_diffusion").config == vae.config


def test_load_errors_name_the_file(fixtures_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    shutil.copytree(fixtures_dir / "models/vae/model", folder)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    with pytest.raises(WeightsError, match=WEIGHTS_NAME):
        load_vae(folder)
    weights.write_bytes(data)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "latent_channels": 8}))
    with pytest.raises(WeightsError, match="shape mismatches: .*quant_conv"):
        load_vae(folder)
    weights.unlink()
    with pytest.raises(WeightsError, match="weights? file not found"):
        load_vae(folder)
