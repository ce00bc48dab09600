"""Single-file SD-1.x checkpoints (CompVis key layout): round trips, config inference, pickles, key errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.single_file import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    infer_text_encoder_config,
    infer_unet_config,
    infer_vae_config,
    text_encoder_key_map,
    to_single_file_state_dict,
    unet_key_map,
    vae_key_map,
)
from diffusekit.io.text import load_tokenizer
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS, ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNET_PRESETS, UNet, UNetConfig
from diffusekit.networks.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from diffusekit.pipelines.common import LatentCodec
from diffusekit.pipelines.loading import load_pipeline, parts_of, save_pipeline
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.samplers.config import SamplerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd(sd_folder: Path) -> StableDiffusion:
    return load_pipeline(sd_folder)


@pytest.fixture(scope="module")
def single_file(sd: StableDiffusion, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_pipeline(sd, path)
    return path


def _networks(sd: StableDiffusion) -> dict[str, dict[str, torch.Tensor]]:
    return {"unet": sd.unet.state_dict(), "vae": sd.codec.vae.state_dict(), "text": sd.text_encoder.state_dict()}


def _max_diff(a: StableDiffusion, b: StableDiffusion) -> float:
    worst = 0.0
    for name, sa in _networks(a).items():
        sb = _networks(b)[name]
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
            worst = max(worst, float((sa[k] - sb[k]).abs().max()))
    return worst


def _latents(sd: StableDiffusion) -> torch.Tensor:
    result = TextToImage(sd)(["a red fox", "a lighthouse"], negative_prompt="blurry", height=16, width=16, steps=2,
                             generator=torch.Generator().manual_seed(3), show_progress=False)  # fmt: skip
    return result.latents


def test_round_trip_through_a_single_file_is_exact(sd, sd_folder, single_file, tmp_path):
    keys = load_file(str(single_file)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    back = load_pipeline(single_file, tokenizer=sd_folder / "tokenizer")
    assert _max_diff(sd, back) == 0.0
    assert back.sampler_config == sd.sampler_config
    assert torch.equal(_latents(sd), _latents(back))

    # ... and on to a diffusers folder again
    save_pipeline(back, tmp_path / "folder")
    again = load_pipeline(tmp_path / "folder")
    assert _max_diff(sd, again) == 0.0


def test_sd15_sized_key_maps_follow_the_compvis_layout():
    unet = unet_key_map(UNET_PRESETS["sd15"])
    vae = vae_key_map(VAE_PRESETS["sd"])
    text = text_encoder_key_map(TEXT_ENCODER_PRESETS["sd1"])
    assert (len(unet.names), len(vae.names), len(text.names)) == (686, 248, 196)  # as in v1-5-pruned files
    names = set(unet.names.values()) | set(vae.names.values()) | set(text.names.values())
    for key in [
        "input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "input_blocks.4.0.skip_connection.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_out.weight",
        "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight", "output_blocks.11.1.norm.bias", "time_embed.2.weight", "out.2.bias",
    ]:  # fmt: skip
        assert UNET_PREFIX + key in names, key
    for key in [
        "encoder.down.3.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight", "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight", "decoder.norm_out.weight", "post_quant_conv.bias",
    ]:  # fmt: skip
        assert VAE_PREFIX + key in names, key
    assert TEXT_ENCODER_PREFIX + "encoder.layers.11.self_attn.out_proj.weight" in names
    assert vae.conv_weights == {f"{side}.mid_block.attentions.0.{p}.weight" for side in ("encoder", "decoder")
                                for p in ("to_q", "to_k", "to_v", "to_out.0")}  # fmt: skip


def _file_shapes(model_cls, config, key_map, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors (meta: shapes only) a single file holds for this network, with the prefix removed."""
    with torch.device("meta"):
        state = model_cls(config).state_dict()
    out = {}
    for ours, theirs in key_map.names.items():
        v = state[ours]
        out[theirs[len(prefix) :]] = v[:, :, None, None] if ours in key_map.conv_weights else v
    return out


def test_sd15_configs_are_inferred_from_shapes():
    unet, vae, text = UNET_PRESETS["sd15"], VAE_PRESETS["sd"], TEXT_ENCODER_PRESETS["sd1"]
    assert infer_unet_config(_file_shapes(UNet, unet, unet_key_map(unet), UNET_PREFIX)) == unet
    assert infer_vae_config(_file_shapes(AutoencoderKL, vae, vae_key_map(vae), VAE_PREFIX)) == vae
    inferred = infer_text_encoder_config(_file_shapes(ClipTextEncoder, text, text_encoder_key_map(text),
                                                      TEXT_ENCODER_PREFIX))  # fmt: skip
    assert inferred == text
    inpaint = UNET_PRESETS["sd15-inpaint"]
    assert infer_unet_config(_file_shapes(UNet, inpaint, unet_key_map(inpaint), UNET_PREFIX)) == inpaint


def _small_sd1_compatible(tokenizer_folder: Path) -> StableDiffusion:
    """A small model whose sizes SD-1.x's rules (32 groups, 8 U-Net heads, 64-wide text heads) describe."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_folder)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, channels=(32, 64), layers_per_block=1,
                           attention_levels=(True, False), num_heads=(8, 8), cross_attention_dim=64, norm_groups=32,
                           sample_size=64))  # fmt: skip
    for p in unet.parameters():  # zero-initialised layers would hide mapping mistakes
        torch.nn.init.normal_(p, std=0.05)
    vae = AutoencoderKL(VAEConfig(channels=(32, 64), layers_per_block=1, norm_groups=32, sample_size=512))
    text = ClipTextEncoder(TextEncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2,
                                             num_heads=1, mlp_size=37, bos_id=tokenizer.bos_id,
                                             eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id))  # fmt: skip
    sampler = SamplerConfig(sampler="ddim")
    return StableDiffusion(unet.eval(), LatentCodec(vae.eval()), tokenizer, text.eval(), sampler)


def test_pickled_checkpoint_is_refused_then_loaded_with_allow_pickle(sd_folder, tmp_path):
    model = _small_sd1_compatible(sd_folder / "tokenizer")
    path = tmp_path / "small.ckpt"
    state = to_single_file_state_dict(parts_of(model))
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # training buffers real files carry: ignored
    torch.save({"state_dict": state, "global_step": 1234}, path)

    with pytest.raises(WeightsError) as refused:
        load_pipeline(path, tokenizer=sd_folder / "tokenizer")
    message = str(refused.value)
    assert str(path) in message and "--allow-pickle" in message and "diffusekit convert" in message

    # no metadata in a pickle: every size comes from the tensor shapes
    loaded = load_pipeline(path, tokenizer=sd_folder / "tokenizer", allow_pickle=True)
    assert loaded.unet.config == model.unet.config
    assert loaded.codec.vae.config == model.codec.vae.config
    assert loaded.text_encoder.config == model.text_encoder.config
    assert _max_diff(model, loaded) == 0.0
    model.prepare()  # the runtime layout load_pipeline applies, so that both compute the same way
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context=ctx), loaded.unet(x, t, context=ctx))


def test_pickle_that_is_not_plain_tensors_is_refused_even_when_allowed(sd_folder, tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/")}, path)  # an arbitrary object
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_pipeline(path, tokenizer=sd_folder / "tokenizer", allow_pickle=True)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = load_file(str(src))
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    edit(state, metadata)
    save_file(state, str(dst), metadata=metadata)
    return dst


def test_missing_unexpected_and_misshaped_keys_are_named(sd_folder, single_file, tmp_path):
    tok = sd_folder / "tokenizer"
    gone = "first_stage_model.decoder.mid.attn_1.k.bias"
    path = _rewrite(single_file, tmp_path / "missing.safetensors", lambda s, m: s.pop(gone))
    with pytest.raises(WeightsError, match="missing keys: " + gone.replace(".", r"\.")) as e:
        load_pipeline(path, tokenizer=tok)
    assert str(path) in str(e.value)

    path = _rewrite(single_file, tmp_path / "extra.safetensors", lambda s, m: s.update(junk=torch.zeros(2)))
    with pytest.raises(WeightsError, match="unexpected keys: junk"):
        load_pipeline(path, tokenizer=tok)

    def shrink(s, m):
        s["model.diffusion_model.out.2.bias"] = torch.zeros(3)

    path = _rewrite(single_file, tmp_path / "shape.safetensors", shrink)
    with pytest.raises(WeightsError, match=r"model\.diffusion_model\.out\.2\.bias \(file \(3,\), expected \(4,\)\)"):
        load_pipeline(path, tokenizer=tok)

    def old_text_names(s, m):  # early files: cond_stage_model.transformer.<name>, without text_model.
        for k in [k for k in s if k.startswith(TEXT_ENCODER_PREFIX)]:
            s["cond_stage_model.transformer." + k[len(TEXT_ENCODER_PREFIX) :]] = s.pop(k)

    path = _rewrite(single_file, tmp_path / "old.safetensors", old_text_names)
    assert load_pipeline(path, tokenizer=tok).text_encoder.config.num_layers == 2

    path = _rewrite(single_file, tmp_path / "sd2.safetensors",
                    lambda s, m: s.update({"cond_stage_model.model.ln_final.weight": torch.ones(2)}))  # fmt: skip
    with pytest.raises(WeightsError, match="SD-2.x"):
        load_pipeline(path, tokenizer=tok)


def test_bad_metadata_tokenizer_and_vocabulary_errors(fixtures_dir, sd_folder, single_file, tmp_path):
    def corrupt(s, m):
        m["diffusekit.unet"] = "[" * 100_000

    path = _rewrite(single_file, tmp_path / "meta.safetensors", corrupt)
    with pytest.raises(WeightsError, match="diffusekit.unet"):
        load_pipeline(path, tokenizer=sd_folder / "tokenizer")

    def wrong_type(s, m):
        m["diffusekit.vae"] = json.dumps({"channels": "many"})

    path = _rewrite(single_file, tmp_path / "meta2.safetensors", wrong_type)
    with pytest.raises(WeightsError, match="diffusekit.vae"):
        load_pipeline(path, tokenizer=sd_folder / "tokenizer")

    with pytest.raises(ConfigError, match="--tokenizer"):
        load_pipeline(single_file)
    with pytest.raises(WeightsError, match="tokenizer this model was trained with"):
        load_pipeline(single_file, tokenizer=fixtures_dir / "clip_tokenizer_real")  # 49,408 tokens vs 740


def test_convert_cli_round_trip(sd, sd_folder, tmp_path, capsys):
    file = tmp_path / "sd.safetensors"
    assert main(["convert", str(sd_folder), str(file)]) == 0
    assert main(["convert", str(sd_folder), str(file)]) == 2  # never overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(file), str(tmp_path / "folder")]) == 2  # a folder needs a tokenizer
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["convert", str(file), str(tmp_path / "folder"), "--tokenizer", str(sd_folder / "tokenizer")]) == 0
    assert _max_diff(sd, load_pipeline(tmp_path / "folder")) == 0.0

    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": load_file(str(file))}, ckpt)
    assert main(["convert", str(ckpt), str(tmp_path / "from-ckpt.safetensors")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    half = tmp_path / "from-ckpt.safetensors"
    assert main(["convert", "--allow-pickle", "--dtype", "float16", str(ckpt), str(half)]) == 0
    tensors = load_file(str(half))
    assert tensors.keys() == load_file(str(file)).keys()
    assert {v.dtype for v in tensors.values()} == {torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Hostile single files


def _with_old_text_copy(s, m, change: str | None = None):
    """Add the text encoder a second time under the older cond_stage_model.transformer.* names (without
    text_model.), optionally with one tensor changed."""
    for k in [k for k in s if k.startswith(TEXT_ENCODER_PREFIX)]:
        s["cond_stage_model.transformer." + k[len(TEXT_ENCODER_PREFIX) :]] = s[k].clone()
    if change is not None:
        s[change] = s[change] + 0.5


def test_a_text_encoder_stored_twice_is_refused_when_the_copies_differ(sd, sd_folder, single_file, tmp_path):
    tok = sd_folder / "tokenizer"
    changed = "cond_stage_model.transformer.encoder.layers.1.mlp.fc2.bias"
    path = _rewrite(single_file, tmp_path / "differ.safetensors", lambda s, m: _with_old_text_copy(s, m, changed))
    with pytest.raises(WeightsError, match="copies differ") as e:
        load_pipeline(path, tokenizer=tok)
    assert str(path) in str(e.value) and changed in str(e.value)

    ckpt = tmp_path / "differ.ckpt"  # the same through the pickle reader
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(WeightsError, match="copies differ"):
        load_pipeline(ckpt, tokenizer=tok, allow_pickle=True)


def test_a_text_encoder_stored_twice_in_equal_copies_loads_and_says_which(sd, sd_folder, single_file, tmp_path):
    path = _rewrite(single_file, tmp_path / "equal.safetensors", _with_old_text_copy)
    with pytest.warns(UserWarning, match=f"{path}: holds the text encoder twice.*equal, using the "
                      r"cond_stage_model\.transformer\.text_model\.\* one"):  # fmt: skip
        back = load_pipeline(path, tokenizer=sd_folder / "tokenizer")
    assert _max_diff(sd, back) == 0.0


def test_non_finite_weights_in_a_single_file_are_refused_and_not_converted(sd_folder, single_file, tmp_path):
    key = "model.diffusion_model.out.2.bias"

    def poison(s, m):
        s[key] = s[key].clone()
        s[key][1] = float("inf")

    path = _rewrite(single_file, tmp_path / "inf.safetensors", poison)
    with pytest.raises(WeightsError, match=f"{path}: tensor '{key}' holds 1 non-finite"):
        load_pipeline(path, tokenizer=sd_folder / "tokenizer")
    ckpt = tmp_path / "inf.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(WeightsError, match=f"{ckpt}: tensor '{key}' holds 1 non-finite"):
        load_pipeline(ckpt, tokenizer=sd_folder / "tokenizer", allow_pickle=True)
    out = tmp_path / "copy.safetensors"
    assert main(["convert", "--allow-pickle", str(ckpt), str(out)]) == 2
    assert main(["convert", str(path), str(out)]) == 2
    assert not out.exists()


def test_pickle_messages_offer_what_diffusekit_does_not_torchs_unsafe_advice(sd_folder, tmp_path):
    tok = sd_folder / "tokenizer"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/")}, evil)
    with pytest.raises(WeightsError) as e:
        load_pipeline(evil, tokenizer=tok, allow_pickle=True)
    message = str(e.value)
    assert "Unsupported global: GLOBAL pathlib.PosixPath" in message and "weights_only=True" in message
    assert "can still be loaded" not in message and "False" not in message and "\x1b" not in message
    assert ".safetensors" in message

    text = tmp_path / "notes.ckpt"  # two bytes of text under a pickle's name
    text.write_text("hi")
    for allow in (False, True):
        with pytest.raises(WeightsError, match=f"{text}: not a weights file") as e:
            load_pipeline(text, tokenizer=tok, allow_pickle=allow)
        assert "pickle" not in str(e.value)[len(str(text)) :].split("(")[0]
    assert main(["convert", str(text), str(tmp_path / "notes.safetensors")]) == 2


def test_convert_writes_files_with_the_umask_permissions(sd_folder, tmp_path):
    import os
    import stat

    before = os.umask(0o022)
    try:
        file = tmp_path / "sd.safetensors"
        assert main(["convert", str(sd_folder), str(file)]) == 0
        assert stat.S_IMODE(file.stat().st_mode) == 0o644
        folder = tmp_path / "folder"
        assert main(["convert", str(file), str(folder), "--tokenizer", str(sd_folder / "tokenizer")]) == 0
        modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")
                 if p.is_file()}  # fmt: skip
        assert modes and set(modes.values()) == {0o644}, modes
    finally:
        os.umask(before)
