"""CLIP text encoder: parity with the reference, config translation, key mapping, I/O, input validation."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.text import (
    OPEN_CLIP_SINGLE_FILE_PREFIX,
    SINGLE_FILE_PREFIX,
    from_open_clip_state_dict,
    load_state_strict,
    load_text_encoder,
    save_text_encoder,
    text_encoder_from_diffusers_state_dict,
    text_encoder_to_diffusers_state_dict,
)
from diffusekit.networks.text_encoder import (
    TEXT_ENCODER_PRESETS,
    ClipTextEncoder,
    TextEncoderConfig,
    quick_gelu,
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def case(fixtures_dir):
    folder = fixtures_dir / "models" / "text_encoder"
    return folder / "model", load_file(folder / "io.safetensors")


@pytest.fixture(scope="module")
def model(case):
    return load_text_encoder(case[0])


def tiny_config(**overrides) -> TextEncoderConfig:
    return TextEncoderConfig(**{**TEXT_ENCODER_PRESETS["tiny"].to_dict(), **overrides})


@torch.no_grad()
def test_parity_with_reference(model, case):
    io = case[1]
    out = model(io["input_ids"])
    torch.testing.assert_close(out.last_hidden_state, io["last_hidden_state"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, io["pooler_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, io["pooler_output"], atol=ATOL, rtol=0)
    assert out.hidden_states.shape == io["hidden_states"].shape == (3, 4, 77, 32)
    torch.testing.assert_close(out.hidden_states, io["hidden_states"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_parity_with_reference_random_ids(model, case):
    io = case[1]
    out = model(io["input_ids_random"])
    torch.testing.assert_close(out.last_hidden_state, io["last_hidden_state_random"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, io["pooler_output_random"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_pooling_uses_first_eos_and_causality(model):
    ids = torch.full((2, 77), 739)
    ids[:, :5] = torch.tensor([738, 320, 500, 600, 700])
    ids[1, 10:] = 100  # row 1: first EOS at 5, later tokens differ
    out = model(ids)
    torch.testing.assert_close(out.pooled, out.last_hidden_state[:, 5])
    # causal: positions up to 9 see the same prefix in both rows
    torch.testing.assert_close(out.last_hidden_state[0, :10], out.last_hidden_state[1, :10])
    # a shorter sequence gives the same prefix states
    torch.testing.assert_close(model(ids[:, :20]).last_hidden_state, out.last_hidden_state[:, :20])


@torch.no_grad()
def test_clip_skip_uses_penultimate_layer(model, case):
    ids = case[1]["input_ids"]
    full = model(ids)
    skipped = model(ids, clip_skip=1)
    assert skipped.hidden_states.shape[0] == 2
    torch.testing.assert_close(skipped.last_hidden_state, model.final_norm(full.hidden_states[-2]))


def test_quick_gelu():
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_presets_have_the_published_sizes():
    sd1, sd2 = TEXT_ENCODER_PRESETS["sd1"], TEXT_ENCODER_PRESETS["sd2"]
    assert (sd1.hidden_size, sd1.num_layers, sd1.num_heads, sd1.mlp_size, sd1.vocab_size) == (768, 12, 12, 3072, 49408)
    assert (sd2.hidden_size, sd2.num_layers, sd2.num_heads, sd2.mlp_size, sd2.activation) == (
        1024,
        23,
        16,
        4096,
        "gelu",
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in ClipTextEncoder(sd1).parameters())
    assert n == 123_060_480  # the SD-1.x text encoder's parameter count


def test_bad_inputs_raise_config_error(model):
    with pytest.raises(ConfigError, match=r"input_ids must lie in \[0, vocab_size=740\)"):
        model(torch.tensor([[738, 740, 739]]))
    with pytest.raises(ConfigError, match="input_ids"):
        model(torch.tensor([[738, -1, 739]]))
    with pytest.raises(ConfigError, match=r"input_ids must have shape \(batch, length\)"):
        model(torch.tensor([738, 739]))
    with pytest.raises(ConfigError, match="max_positions=77"):
        model(torch.full((1, 78), 739))
    with pytest.raises(ConfigError, match="integer"):
        model(torch.zeros(1, 5))
    with pytest.raises(ConfigError, match="clip_skip"):
        model(torch.tensor([[738, 739]]), clip_skip=2)


def test_key_mapping_round_trip_and_prefixes(model):
    ours = model.state_dict()
    ref = text_encoder_to_diffusers_state_dict(ours)
    assert "text_model.embeddings.token_embedding.weight" in ref
    assert "text_model.encoder.layers.1.self_attn.out_proj.bias" in ref
    assert "text_model.final_layer_norm.weight" in ref
    assert text_encoder_from_diffusers_state_dict(ref).keys() == ours.keys()
    single = text_encoder_to_diffusers_state_dict(ours, prefix=SINGLE_FILE_PREFIX)
    single["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # other parts of the checkpoint
    single[SINGLE_FILE_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    back = text_encoder_from_diffusers_state_dict(single, prefix=SINGLE_FILE_PREFIX)
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)


@torch.no_grad()
def test_save_load_round_trip(tmp_path, model, case):
    save_text_encoder(model, tmp_path / "te")
    keys = load_file(tmp_path / "te" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in keys)
    again = load_text_encoder(tmp_path / "te")
    assert again.config == model.config
    ids = case[1]["input_ids"]
    assert torch.equal(again(ids).last_hidden_state, model(ids).last_hidden_state)
    save_text_encoder(model, tmp_path / "plain", prefix="")  # the unprefixed layout loads too
    assert load_text_encoder(tmp_path / "plain").config == model.config


def test_load_from_model_root_and_fp16(tmp_path, case):
    root = tmp_path / "root"
    shutil.copytree(case[0], root / "text_encoder")
    (root / "model_index.json").write_text("{}")
    assert load_text_encoder(root).config.vocab_size == 740
    half = load_text_encoder(root, dtype=torch.float16)
    assert half.token_embedding.weight.dtype == torch.float16


def _copy_with_state(tmp_path, case, edit):
    folder = tmp_path / "bad"
    shutil.copytree(case[0], folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    (folder / "model.safetensors").chmod(0o644)
    save_file(state, folder / "model.safetensors")
    return folder


def test_missing_unexpected_and_misshapen_weights_name_the_file(tmp_path, case):
    folder = _copy_with_state(tmp_path, case, lambda s: s.pop("final_layer_norm.weight"))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*missing keys: final_norm\.weight"):
        load_text_encoder(folder)
    shutil.rmtree(folder)
    folder = _copy_with_state(tmp_path, case, lambda s: s.update(extra=torch.zeros(1)))
    with pytest.raises(WeightsError, match="unexpected keys: extra"):
        load_text_encoder(folder)
    shutil.rmtree(folder)
    folder = _copy_with_state(tmp_path, case, lambda s: s.update({"encoder.layers.0.mlp.fc1.bias": torch.zeros(38)}))
    with pytest.raises(WeightsError, match=r"shape mismatch: blocks\.0\.mlp\.fc1\.bias \(38,\)"):
        load_text_encoder(folder)


def test_missing_or_corrupt_files(tmp_path, case):
    folder = tmp_path / "te"
    shutil.copytree(case[0], folder)
    (folder / "config.json").chmod(0o644)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(WeightsError, match="config.json"):
        load_text_encoder(folder)
    shutil.copy(case[0] / "config.json", folder / "config.json")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_text_encoder(folder)
    with pytest.raises(WeightsError, match="not found"):
        load_text_encoder(tmp_path / "nowhere")


def test_fresh_model_init_and_gradients():
    torch.manual_seed(0)
    model = ClipTextEncoder(tiny_config())
    ids = torch.randint(0, 1000, (2, 16))
    out = model(ids)
    assert out.last_hidden_state.shape == (2, 16, 32) and out.pooled.shape == (2, 32)
    assert torch.isfinite(out.last_hidden_state).all()
    out.pooled.sum().backward()
    assert model.token_embedding.weight.grad is not None


@torch.no_grad()
def test_open_clip_layout_converts(model, case):
    """SD-2.x single files: OpenCLIP names, fused q/k/v, an extra last layer that SD-2.x drops."""
    p, ours = OPEN_CLIP_SINGLE_FILE_PREFIX, model.state_dict()
    state = {
        p + "token_embedding.weight": ours["token_embedding.weight"],
        p + "positional_embedding": ours["position_embedding.weight"],
        p + "ln_final.weight": ours["final_norm.weight"],
        p + "ln_final.bias": ours["final_norm.bias"],
        p + "text_projection": torch.zeros(32, 16),
        p + "logit_scale": torch.zeros(()),
        p + "visual.conv1.weight": torch.zeros(1),
        "model.diffusion_model.out.0.weight": torch.zeros(1),
    }
    for i in range(3):  # one layer more than the model has
        j = min(i, 1)
        r, b = f"{p}transformer.resblocks.{i}.", f"blocks.{j}."
        for kind in ("weight", "bias"):
            state[r + f"attn.in_proj_{kind}"] = torch.cat([ours[b + f"attn.{x}.{kind}"] for x in "qkv"])
            for theirs, mine in [
                ("ln_1", "norm1"),
                ("ln_2", "norm2"),
                ("attn.out_proj", "attn.out"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ]:
                state[r + f"{theirs}.{kind}"] = ours[b + f"{mine}.{kind}"]
    converted = from_open_clip_state_dict(state, num_layers=2)
    fresh = ClipTextEncoder(model.config)
    load_state_strict(fresh, converted, "open_clip")
    ids = case[1]["input_ids"]
    assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)
    with pytest.raises(WeightsError, match="unexpected keys: blocks.2"):
        load_state_strict(fresh, from_open_clip_state_dict(state), "open_clip")
