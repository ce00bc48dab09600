"""LoRA files (diffusekit.io.lora): the fixtures' kohya and PEFT files read into one form, resolved onto our
U-Net and text encoder, written back in both layouts, and refused with clear errors when broken."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.lora import read_lora, resolve, save_lora
from diffusekit.io.models import load_unet
from diffusekit.io.text import load_text_encoder
from diffusekit.networks.lora import LowRank


@pytest.fixture(scope="module")
def lora_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "lora"


@pytest.fixture(scope="module")
def parts(fixtures_dir: Path) -> dict:
    sd = fixtures_dir / "pipelines" / "stable_diffusion"
    return {"unet": load_unet(sd / "unet"), "text_encoder": load_text_encoder(sd / "text_encoder")}


def _kohya(lora_dir: Path) -> Path:
    return lora_dir / "kohya.safetensors"


def _peft(lora_dir: Path) -> Path:
    return lora_dir / "peft" / "pytorch_lora_weights.safetensors"


def test_kohya_fixture_reads_and_resolves_as_its_readme_says(lora_dir, parts):
    """Fixtures README section 11: 60 modules, rank 4, alpha 3 (scale 0.75), 8 of them 1x1 convolutions."""
    f = read_lora(_kohya(lora_dir))
    assert f.format == "kohya" and len(f.modules) == 60
    assert {u.rank for u in f.modules.values()} == {4} and {u.alpha for u in f.modules.values()} == {3.0}
    updates = resolve(f, parts)
    assert sum(len(m) for m in updates.values()) == 60
    te = updates["text_encoder"]
    assert "blocks.0.attn.q" in te and "blocks.1.mlp.fc2" in te  # transformers names -> ours
    unet = updates["unet"]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in unet
    convs = [m for m, u in unet.items() if u.down.ndim == 4]
    assert len(convs) == 8 and all(m.endswith(("proj_in", "proj_out")) for m in convs)


def test_peft_fixture_reads_alpha_from_the_header_metadata(lora_dir, parts):
    """Section 11: 40 modules (q/k/v/out of the U-Net and text encoder), rank 2, lora_alpha 3 (scale 1.5)."""
    f = read_lora(_peft(lora_dir))
    assert f.format == "peft" and len(f.modules) == 40
    assert {u.scale for u in f.modules.values()} == {1.5}
    updates = resolve(f, parts)
    assert len(updates["text_encoder"]) == 8 and len(updates["unet"]) == 32
    assert "blocks.1.attn.out" in updates["text_encoder"]


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("source", ["kohya", "peft"])
def test_write_then_read_round_trips_in_both_layouts(lora_dir, parts, tmp_path, fmt, source):
    original = resolve(read_lora(_kohya(lora_dir) if source == "kohya" else _peft(lora_dir)), parts)
    path = tmp_path / f"out_{fmt}.safetensors"
    save_lora(original, path, format=fmt)
    back = read_lora(path)
    assert back.format == fmt
    again = resolve(back, parts)
    assert again.keys() == original.keys()
    for component, modules in original.items():
        assert again[component].keys() == modules.keys()
        for name, u in modules.items():
            v = again[component][name]
            assert torch.equal(v.down, u.down) and torch.equal(v.up, u.up) and v.alpha == u.alpha, name


def test_peft_writer_records_ranks_and_alphas_that_differ_per_module(parts, tmp_path):
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    updates = {
        "unet": {
            f"{block}.to_q": LowRank(torch.randn(2, 32), torch.randn(32, 2), 3.0),
            f"{block}.to_k": LowRank(torch.randn(2, 32), torch.randn(32, 2), 3.0),
            f"{block}.to_v": LowRank(torch.randn(4, 32), torch.randn(32, 4), 1.0),
        }
    }
    path = tmp_path / "mixed.safetensors"
    save_lora(updates, path, format="peft")
    back = resolve(read_lora(path), parts)["unet"]
    assert {m: (u.rank, u.alpha) for m, u in back.items()} == {m: (u.rank, u.alpha) for m, u in updates["unet"].items()}
    with pytest.raises(ConfigError, match="format='diffusers' is not supported"):
        save_lora(updates, tmp_path / "x.safetensors", format="diffusers")


def test_kohya_stems_in_the_original_compvis_unet_names_resolve(parts, tmp_path):
    """Some trainers name U-Net modules as the original checkpoints do (input_blocks / output_blocks)."""
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"  # = down_blocks.0.attentions.0
    save_file({f"{key}.lora_down.weight": torch.randn(2, 32), f"{key}.lora_up.weight": torch.randn(32, 2)},
              str(tmp_path / "compvis.safetensors"))  # fmt: skip
    f = read_lora(tmp_path / "compvis.safetensors")
    (update,) = f.modules.values()
    assert update.alpha == 2.0  # no .alpha: alpha = r
    assert list(resolve(f, parts)["unet"]) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]


# ---------------------------------------------------------------------------------------------------------
# Bad files: each a WeightsError naming the file and the key


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from diffusekit.io.weights import load_weights

    return load_weights(path)


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_keys_matching_no_module_are_listed(lora_dir, parts, tmp_path):
    t = _tensors(_kohya(lora_dir))
    for i in range(6):
        t[f"lora_unet_down_blocks_9_attentions_{i}_to_q.lora_down.weight"] = torch.ones(4, 32)
        t[f"lora_unet_down_blocks_9_attentions_{i}_to_q.lora_up.weight"] = torch.ones(32, 4)
    path = _write(tmp_path / "extra.safetensors", t)
    f = read_lora(path)
    with pytest.raises(WeightsError, match=r"extra.safetensors: 6 of 66 adapted modules match no layer of the model: "
                                           r"lora_unet_down_blocks_9_attentions_0_to_q, .*\(6 in all\)"):  # fmt: skip
        resolve(f, parts)


def test_a_lora_of_another_architecture_is_named_as_such(parts, tmp_path):
    # an SDXL-style file: a second text encoder, and U-Net modules this model does not have
    stem = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    t = {f"{stem}.lora_{r}.weight": torch.ones(4, 4) for r in ("down", "up")}
    with pytest.raises(WeightsError, match="has adapters for text_encoder_2 .* made for another model family"):
        resolve(read_lora(_write(tmp_path / "sdxl.safetensors", t)), parts)
    t = {f"lora_unet_down_blocks_2_attentions_1_transformer_blocks_{i}_attn1_to_q.lora_{r}.weight": torch.ones(4, 4)
         for i in range(3) for r in ("down", "up")}  # fmt: skip
    with pytest.raises(WeightsError, match=r"other.safetensors: made for another model family: 3 of 3 adapted"):
        resolve(read_lora(_write(tmp_path / "other.safetensors", t)), parts)


def test_shape_and_rank_mismatches_name_the_key(parts, tmp_path):
    wrong_in = {f"{K}.lora_down.weight": torch.ones(4, 40), f"{K}.lora_up.weight": torch.ones(32, 4)}
    with pytest.raises(WeightsError, match=rf"wrong_in.safetensors: {K}: .*shapes down \(4, 40\)"):
        resolve(read_lora(_write(tmp_path / "wrong_in.safetensors", wrong_in)), parts)
    ranks = {f"{K}.lora_down.weight": torch.ones(4, 32), f"{K}.lora_up.weight": torch.ones(32, 3)}
    with pytest.raises(WeightsError, match=rf"ranks.safetensors: {K}: rank mismatch"):
        read_lora(_write(tmp_path / "ranks.safetensors", ranks))
    half = {f"{K}.lora_down.weight": torch.ones(4, 32)}
    with pytest.raises(WeightsError, match=rf"half.safetensors: .*{K} \(no up weight\)"):
        read_lora(_write(tmp_path / "half.safetensors", half))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_is_refused_naming_the_key(tmp_path, alpha):
    t = {f"{K}.lora_down.weight": torch.ones(4, 32), f"{K}.lora_up.weight": torch.ones(32, 4),
         f"{K}.alpha": torch.tensor(alpha)}  # fmt: skip
    with pytest.raises(WeightsError, match=rf"alpha.safetensors: .*{K}.alpha"):
        read_lora(_write(tmp_path / "alpha.safetensors", t))


@pytest.mark.parametrize("value", [0, -3, "3", None, float("nan")])
def test_bad_peft_metadata_alpha_is_refused(tmp_path, value):
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = {f"{k}.lora_A.weight": torch.ones(2, 32), f"{k}.lora_B.weight": torch.ones(32, 2)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": value})}
    with pytest.raises(WeightsError, match=r"meta.safetensors: metadata unet.lora_alpha: alpha must be"):
        read_lora(_write(tmp_path / "meta.safetensors", t, meta))


def test_truncated_pickled_foreign_and_unsupported_files(lora_dir, tmp_path):
    data = _kohya(lora_dir).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors: corrupt safetensors file"):
        read_lora(tmp_path / "cut.safetensors")
    with open(tmp_path / "lora.pt", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(WeightsError, match="lora.pt: is a Python pickle"):
        read_lora(tmp_path / "lora.pt")
    (tmp_path / "notes.safetensors").write_text("hello")
    with pytest.raises(WeightsError, match="notes.safetensors: not a weights file"):
        read_lora(tmp_path / "notes.safetensors")
    loha = {f"{K}.hada_w1_a": torch.ones(2, 2)}
    with pytest.raises(WeightsError, match=f"{K}.hada_w1_a' belongs to a LoHa adapter"):
        read_lora(_write(tmp_path / "loha.safetensors", loha))
    model = {"conv_in.weight": torch.ones(2, 2)}
    with pytest.raises(WeightsError, match="model.safetensors: 1 keys are not LoRA keys .*conv_in.weight"):
        read_lora(_write(tmp_path / "model.safetensors", model))
    with pytest.raises(WeightsError, match="empty.safetensors: holds no tensors"):
        read_lora(_write(tmp_path / "empty.safetensors", {}))


def test_non_finite_adapter_weights_are_refused(tmp_path):
    t = {f"{K}.lora_down.weight": torch.ones(4, 32), f"{K}.lora_up.weight": torch.ones(32, 4)}
    t[f"{K}.lora_up.weight"][3, 1] = float("inf")
    with pytest.raises(WeightsError, match=rf"inf.safetensors: tensor '{K}.lora_up.weight' holds 1 non-finite"):
        read_lora(_write(tmp_path / "inf.safetensors", t))


def test_a_finite_but_absurd_alpha_is_refused_naming_the_key(tmp_path):
    """alpha 1e308 at rank 2 is finite, but scales the update to infinity in float32."""
    stem = "lora_unet_mid_block_attentions_0_proj_out"
    tensors = {f"{stem}.lora_down.weight": torch.ones(2, 64), f"{stem}.lora_up.weight": torch.ones(64, 2),
               f"{stem}.alpha": torch.tensor(1e30)}  # fmt: skip
    save_file(tensors, str(tmp_path / "big.safetensors"))
    with pytest.raises(WeightsError, match=r"big\.safetensors: .*lora_down\.weight: alpha 1e\+30 over rank 2"):
        read_lora(tmp_path / "big.safetensors")
    tensors[f"{stem}.alpha"] = torch.tensor(64.0)  # scale 32: accepted
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    assert read_lora(tmp_path / "ok.safetensors").modules
