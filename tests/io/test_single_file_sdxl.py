"""SDXL single files in the SGM layout (diffusekit.io.single_file_sdxl): the tiny SDXL fixture folder -> one
.safetensors file -> a folder again is exact; the file's tensors against the reference folder's own (the
OpenCLIP q/k/v stacked, the projection transposed, the added embedding under label_emb); configs inferred from
shapes alone for SDXL-shaped networks; a missing text encoder, the refiner and missing tokenizers named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.single_file_sdxl import (
    TEXT_ENCODER_1_PREFIX,
    TEXT_ENCODER_2_PREFIX,
    SDXLSingleFileParts,
    read_sdxl_single_file_parts,
    to_sdxl_state_dict,
)
from diffusekit.io.text import load_tokenizer
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.networks.vae import AutoencoderKL, VAEConfig
from diffusekit.pipelines.loading import SDXL_FILE, identify, load_pipeline, save_pipeline
from diffusekit.pipelines.sdxl import StableDiffusionXL, TextToImageXL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_xl"


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> StableDiffusionXL:
    return load_pipeline(sdxl_dir)


@pytest.fixture(scope="module")
def xl_file(sdxl: StableDiffusionXL, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pipeline(sdxl, tmp_path_factory.mktemp("xl") / "sd_xl_tiny.safetensors")


def _images(sd: StableDiffusionXL) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return TextToImageXL(sd)(["a cat", "a dog"], height=16, width=16, steps=2, generator=g, show_progress=False).images


def test_folder_to_single_file_to_folder_is_exact(sdxl, sdxl_dir, xl_file, tmp_path):
    assert identify(xl_file) == SDXL_FILE
    back = load_pipeline(xl_file, tokenizer=sdxl_dir)
    assert isinstance(back, StableDiffusionXL)
    folder = save_pipeline(back, tmp_path / "again")
    again = load_pipeline(folder)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(sdxl, name), getattr(again, name)
        assert a.config == b.config, name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert sdxl.codec.vae.config == again.codec.vae.config
    va, vb = sdxl.codec.vae.state_dict(), again.codec.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)
    assert again.sampler_config == sdxl.sampler_config
    assert again.force_zeros_for_empty_prompt is sdxl.force_zeros_for_empty_prompt
    # the reference folder's own files hold the same tensors as the folder written back
    for part in ("text_encoder_2/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        ref, ours = load_file(sdxl_dir / part), load_file(folder / part)
        assert all(torch.equal(ref[k], ours[k]) for k in ref if k in ours), part
    assert torch.equal(_images(sdxl), _images(back))


def test_the_file_holds_the_sgm_names_of_the_reference_tensors(sdxl_dir, xl_file):
    """Checked against the reference folder's tensors, not against our own key maps."""
    f = load_file(xl_file)
    te2 = load_file(sdxl_dir / "text_encoder_2" / "model.safetensors")
    te1 = load_file(sdxl_dir / "text_encoder" / "model.safetensors")
    unet = load_file(sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    p = TEXT_ENCODER_2_PREFIX
    for i in range(3):
        attn = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = torch.cat([te2[f"{attn}{x}_proj.{kind}"] for x in "qkv"])
            assert torch.equal(f[f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"], qkv)
        assert torch.equal(f[f"{p}transformer.resblocks.{i}.mlp.c_fc.weight"],
                           te2[f"text_model.encoder.layers.{i}.mlp.fc1.weight"])  # fmt: skip
    assert torch.equal(f[f"{p}text_projection"], te2["text_projection.weight"].T)  # (width, projection)
    assert torch.equal(f[f"{p}positional_embedding"], te2["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(f[f"{p}ln_final.weight"], te2["text_model.final_layer_norm.weight"])
    for k, v in te1.items():
        if "position_ids" not in k:
            assert torch.equal(f[TEXT_ENCODER_1_PREFIX + k.removeprefix("text_model.")], v), k
    for i, j in ((1, 0), (2, 2)):
        assert torch.equal(f[f"model.diffusion_model.label_emb.0.{j}.weight"], unet[f"add_embedding.linear_{i}.weight"])
    assert torch.equal(f["model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight"],
                       unet["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"])  # fmt: skip
    assert not any(k.startswith("cond_stage_model.") for k in f)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """``src`` with its tensors edited in place by ``edit``, written to ``dst`` with the same metadata."""
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    state = load_file(src)
    edit(state)
    save_file(state, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize(("gone", "named"), [(TEXT_ENCODER_2_PREFIX, "second text encoder"),
                                             (TEXT_ENCODER_1_PREFIX, "first text encoder")])  # fmt: skip
def test_a_file_missing_a_text_encoder_names_the_file_and_the_prefix(sdxl_dir, xl_file, tmp_path, gone, named):
    path = _rewrite(xl_file, tmp_path / "no_te.safetensors",
                    lambda s: [s.pop(k) for k in [k for k in s if k.startswith(gone)]])  # fmt: skip
    assert identify(path) == SDXL_FILE
    with pytest.raises(WeightsError) as e:
        load_pipeline(path, tokenizer=sdxl_dir)
    text = str(e.value)
    assert text.startswith(str(path)) and named in text and f"no {gone}* keys" in text and "\n" not in text
    # checked before the tokenizers are asked for
    with pytest.raises(WeightsError, match=f"no {gone}"):
        load_pipeline(path)


def test_the_refiner_and_missing_tokenizers_are_named(sdxl_dir, sd_folder, xl_file, tmp_path):
    def refiner(s):
        for k in [k for k in s if k.startswith(("conditioner.embedders.",))]:
            v = s.pop(k)
            if k.startswith(TEXT_ENCODER_2_PREFIX):
                s[k.replace(TEXT_ENCODER_2_PREFIX, "conditioner.embedders.0.model.")] = v

    path = _rewrite(xl_file, tmp_path / "refiner.safetensors", refiner)
    with pytest.raises(WeightsError, match=r"refiner.safetensors: an SDXL refiner checkpoint"):
        load_pipeline(path, tokenizer=sdxl_dir)
    for tokenizer in (None, sd_folder / "tokenizer", sd_folder):
        with pytest.raises(ConfigError, match=r"sd_xl_tiny.safetensors: .*tokenizer/ and tokenizer_2/"):
            load_pipeline(xl_file, tokenizer=tokenizer)


def test_misshaped_and_unexpected_tensors_are_named(sdxl_dir, xl_file, tmp_path):
    key = f"{TEXT_ENCODER_2_PREFIX}transformer.resblocks.0.attn.in_proj_weight"

    def edit(s):
        s[key] = s[key][:96]
        s["conditioner.embedders.2.junk"] = torch.zeros(2)

    path = _rewrite(xl_file, tmp_path / "bad.safetensors", edit)
    with pytest.raises(WeightsError, match=r"bad.safetensors does not fit the SDXL single-file \(SGM\) layout: "
                                           r".*unexpected keys: conditioner.embedders.2.junk.*shape mismatches: "
                                           rf"{key} \(file \(96, 48\), expected \(144, 48\)\)"):  # fmt: skip
        load_pipeline(path, tokenizer=sdxl_dir)


def test_configs_are_inferred_from_the_shapes_of_sdxl_shaped_networks(sdxl_dir, tmp_path):
    """A file without our metadata (as other tools write them): networks with SDXL's conventions (64-wide
    heads, 32 GroupNorm groups, per-level transformer depth, the added embedding) come back with the configs
    they were built with."""
    tok, tok_2 = load_tokenizer(sdxl_dir / "tokenizer"), load_tokenizer(sdxl_dir / "tokenizer_2")
    te = TextEncoderConfig(vocab_size=740, hidden_size=64, num_layers=2, num_heads=1, mlp_size=96,
                           bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip
    te_2 = TextEncoderConfig(vocab_size=740, hidden_size=128, num_layers=2, num_heads=2, mlp_size=160,
                             activation="gelu", projection_dim=32, bos_id=tok_2.bos_id, eos_id=tok_2.eos_id,
                             pad_id=tok_2.pad_id)  # fmt: skip
    unet = UNetConfig(in_channels=4, out_channels=4, channels=(64, 128, 128), layers_per_block=2,
                      attention_levels=(False, True, True), mid_attention=True, num_heads=(1, 2, 2),
                      cross_attention_dim=192, transformer_depth=(1, 2, 3), use_linear_projection=True,
                      text_time_features=32 + 6 * 8, time_id_features=8, norm_groups=32, sample_size=128)  # fmt: skip
    vae = VAEConfig(in_channels=3, out_channels=3, latent_channels=4, channels=(32, 64), layers_per_block=1,
                    norm_groups=32, scaling_factor=0.13025, sample_size=1024)  # fmt: skip
    torch.manual_seed(0)
    nets = [UNet(unet), AutoencoderKL(vae), ClipTextEncoder(te), ClipTextEncoder(te_2)]
    for net in nets:  # non-zero everywhere, so that a swapped tensor shows
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.02)
    parts = SDXLSingleFileParts(unet, nets[0].state_dict(), vae, nets[1].state_dict(), te, nets[2].state_dict(),
                                None, te_2, nets[3].state_dict())  # fmt: skip
    path = tmp_path / "other_tool.safetensors"
    save_file(to_sdxl_state_dict(parts), str(path))  # no diffusekit metadata
    back = read_sdxl_single_file_parts(path, tok, tok_2)
    assert back.unet_config == unet
    assert back.vae_config == vae
    assert back.text_encoder_config.num_heads == 64 // 64 and back.text_encoder_config.activation == "quick_gelu"
    assert back.text_encoder_config == te
    assert back.text_encoder_2_config == te_2
    assert back.sampler.sampler == "euler" and back.sampler.timestep_spacing == "leading"
    for ours, net in zip((back.unet, back.vae, back.text_encoder, back.text_encoder_2), nets):
        state = net.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in state.items())
