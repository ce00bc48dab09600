"""Writing LoRA files (io.lora.save_lora): an existing file is kept with overwrite=False, header metadata is
written as given, and the reference's own kohya converter (diffusers' ``lora_state_dict``, which needs no
PEFT) reads our kohya keys onto modules its U-Net has, with our tensors and alphas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.lora import read_lora, save_lora
from diffusekit.io.models import load_unet
from diffusekit.io.text import load_text_encoder
from diffusekit.io.weights import SafetensorsFile
from diffusekit.networks.layers import Linear
from diffusekit.networks.lora import LowRank


@pytest.fixture(scope="module")
def parts(fixtures_dir: Path) -> dict:
    sd = fixtures_dir / "pipelines" / "stable_diffusion"
    return {"unet": load_unet(sd / "unet"), "text_encoder": load_text_encoder(sd / "text_encoder")}


def _updates(parts: dict, rank: int = 2) -> dict[str, dict[str, LowRank]]:
    """A random update of every attention projection of the U-Net and the text encoder's q projections."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, LowRank]] = {}
    for component, model in parts.items():
        for name, layer in model.named_modules():
            keep = name.endswith(("to_q", "to_k", "to_v", "to_out.0")) if component == "unet" else name.endswith("q")
            if isinstance(layer, Linear) and keep:
                down = torch.randn(rank, layer.in_features, generator=g)
                up = torch.randn(layer.out_features, rank, generator=g)
                out.setdefault(component, {})[name] = LowRank(down, up, 1.5)
    return out


def test_overwrite_false_keeps_an_existing_file(parts, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(WeightsError, match="appeared"):
        save_lora(_updates(parts), path, overwrite=False)
    assert path.read_bytes() == b"precious"
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind
    save_lora(_updates(parts), path, overwrite=True)
    assert read_lora(path).format == "kohya"


def test_metadata_is_written_into_the_header(parts, tmp_path):
    path = tmp_path / "m.safetensors"
    save_lora(_updates(parts), path, metadata={"ss_network_dim": "2", "ss_network_alpha": "1.5"})
    with SafetensorsFile(path) as f:
        assert f.metadata["ss_network_dim"] == "2" and f.metadata["ss_network_alpha"] == "1.5"
        assert f.metadata["format"] == "pt"
    with pytest.raises(ConfigError, match="strings"):
        save_lora(_updates(parts), tmp_path / "bad.safetensors", metadata={"ss_network_dim": 2})


def test_the_reference_converter_reads_our_kohya_keys(parts, fixtures_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    updates = _updates(parts)
    path = tmp_path / "kohya.safetensors"
    save_lora(updates, path, format="kohya")
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    ref_unet = diffusers.UNet2DConditionModel.from_pretrained(fixtures_dir / "pipelines" / "stable_diffusion" / "unet")
    ref_modules = dict(ref_unet.named_modules())
    unet_keys = [k for k in state if k.startswith("unet.")]
    assert len(unet_keys) == 2 * len(updates["unet"])  # down and up of each module
    for module, u in updates["unet"].items():  # our module names are the reference's in the U-Net
        assert module in ref_modules
        attention, projection = module.removesuffix(".0").rsplit(".", 1)  # ...attn1, to_q (to_out.0 -> to_out)
        stem = f"unet.{attention}.processor.{projection}_lora"  # the converter's attention-processor keys
        torch.testing.assert_close(state[f"{stem}.down.weight"], u.down, rtol=0, atol=0)
        torch.testing.assert_close(state[f"{stem}.up.weight"], u.up, rtol=0, atol=0)
    assert {v for v in alphas.values()} == {1.5}
    te = [k for k in state if k.startswith("text_encoder.")]
    assert len(te) == 2 * len(updates["text_encoder"])
