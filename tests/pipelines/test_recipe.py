"""The generation recipe (pipelines/recipe.py): built from a dict with validation in the caller's vocabulary,
standard JSON out, PNG metadata, model fingerprints and the causes a replay names, inputs and model checks."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.io.fingerprint import model_fingerprint
from diffusekit.pipelines.recipe import (
    METADATA_KEY,
    PARAMETERS_KEY,
    Recipe,
    load_inputs,
    parse_size,
    png_text,
    read_png_metadata,
    recipe_from_metadata,
    replay_differences,
    resolve,
    to_metadata,
)
from diffusekit.samplers.config import SamplerConfig

BODY = {"mode": "txt2img", "prompt": "a fox", "model": "/models/sd15"}


def test_from_dict_fills_defaults_and_round_trips_through_standard_json():
    r = Recipe.from_dict(BODY)
    assert (r.steps, r.guidance, r.seed, r.sampler, r.width, r.strength, r.dtype) == (25, 7.5, 0, None, None, None,
                                                                                      "float32")  # fmt: skip
    assert Recipe.from_dict({**BODY, "mode": "img2img", "image": "/in.png"}).strength == 0.6
    assert Recipe.from_dict({**BODY, "mode": "inpaint", "image": "/a.png", "mask": "/m.png"}).strength == 1.0
    r = Recipe.from_dict({**BODY, "guidance": 7, "width": 512, "height": 768, "sampler": "euler-a"})
    assert type(r.guidance) is float and r.sampler == "euler_ancestral"
    text = r.to_json()
    assert json.loads(text) == r.to_dict()
    assert Recipe.from_dict(json.loads(text)) == r


def test_to_json_never_writes_nan_or_infinity():
    r = Recipe.from_dict(BODY).replace(guidance=math.nan)  # bypassing validation
    with pytest.raises(ValueError):
        r.to_json()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"steps": 0}, "field 'steps' must be an integer in [1, 1000], got 0"),
        ({"steps": 2.0}, "field 'steps' must be an integer"),
        ({"guidance": math.inf}, "field 'guidance' must be a finite number in [0.0, 1000.0]"),
        ({"guidance": True}, "field 'guidance' must be a finite number"),
        ({"width": 22, "height": 16}, "field 'width' must be a multiple of 4, got 22"),
        ({"width": 16}, "field 'width' and field 'height' must be given together"),
        ({"sampler": "rk4"}, "field 'sampler' must be a sampler name: 'Euler', 'Euler a', 'Heun', 'DPM2',"),
        ({"sampler": "DDIM", "karras": True}, "field 'sampler' 'DDIM' and field 'karras' True disagree"),
        ({"sampler": "ddim", "karras": True}, "field 'sampler': Karras sigmas apply to the samplers euler,"),
        ({"karras": "yes"}, "field 'karras' must be true or false"),
        ({"loras": "style.safetensors"}, "field 'loras' must be a list of at most 32 objects"),
        ({"loras": [{"path": "/s.safetensors", "weight": math.inf}]}, "field 'loras'[0] weight must be a finite"),
        ({"loras": [{"path": "/s.safetensors", "scale": 1}]}, "field 'loras'[0] must be an object with path"),
        ({"loras": [{"path": "/s.safetensors", "sha256": "abc"}]}, "field 'loras' s.safetensors sha256 must be a "),
        ({"eta": 0.5, "sampler": "euler"}, "field 'eta' applies to the ddim sampler only, not euler"),
        ({"strength": 0.5}, "field 'strength' is not used by txt2img"),
        ({"mode": "img2img", "image": "/in.png", "strength": 0.3, "steps": 3},
         "field 'strength' 0.3 with field 'steps' 3 runs no denoising step"),
        ({"mode": "img2img"}, "field 'image' must be a string"),
        ({"mode": "img2img", "image": "/a.png", "mask": "/m.png"}, "field 'mask' is used by inpaint only"),
        ({"model": ""}, "field 'model' must name a file or folder"),
        ({"dtype": "int8"}, "field 'dtype' must be one of float32, float16, bfloat16"),
        ({"stepz": 3}, "unknown field 'stepz'; the fields are mode, prompt,"),
        ({"prompt": None}, "field 'prompt' must be a string"),
    ],
)  # fmt: skip
def test_from_dict_names_the_field(changes, expected):
    with pytest.raises(ConfigError) as e:
        Recipe.from_dict({**BODY, **changes})
    assert expected in str(e.value)


def test_messages_use_the_callers_vocabulary():
    options = {"steps": "--steps", "negative_prompt": "--negative"}.get
    with pytest.raises(ConfigError, match=r"^--steps must be an integer in \[1, 1000\], got 0$"):
        Recipe.from_dict({**BODY, "steps": 0}, name=lambda f: options(f, f))
    with pytest.raises(ConfigError, match="^missing field 'prompt', field 'model'$"):
        Recipe.from_dict({"mode": "txt2img"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        Recipe.from_dict(["not", "a", "dict"])


@pytest.mark.parametrize("text", ["-16x16", "16x-16", "0", "16x0", "22x16", "16384x16392", "big", "16x16x16", ""])
def test_parse_size_refuses_with_the_form_and_bounds(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text, "--size")
    message = str(e.value)
    assert message.startswith("--size must be WIDTHxHEIGHT in pixels") and "multiple of 4 from 8 to 16384" in message
    assert repr(text) in message


def test_parse_size_reads_the_allowed_forms():
    assert parse_size("512x768") == (512, 768)
    assert parse_size(" 64 ") == (64, 64)
    assert parse_size("16384X8") == (16384, 8)


def test_png_metadata_round_trip(tmp_path):
    r = Recipe.from_dict({**BODY, "negative_prompt": "blurry", "sampler": "ddim", "eta": 0.0, "seed": 9})
    meta = to_metadata(r, width=64, height=32, sampler="ddim", provenance={"device": "cpu", "batch_size": 1})
    path = tmp_path / "x.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in png_text(meta).items():
        info.add_text(k, v)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    read = read_png_metadata(path)
    assert read == json.loads(json.dumps(meta))
    again = recipe_from_metadata(read, f"--replay {path}")
    assert again == r.replace(width=64, height=32)
    with Image.open(path) as im:
        assert im.info[PARAMETERS_KEY].startswith("a fox\nNegative prompt: blurry\nSteps: 25, Sampler: DDIM,")
    assert METADATA_KEY in png_text(meta)
    with pytest.raises(ConfigError, match=r"field 'steps'"):
        recipe_from_metadata({**read, "steps": -1}, f"--replay {path}")
    with pytest.raises(ConfigError, match="the metadata lacks seed"):
        recipe_from_metadata({k: v for k, v in read.items() if k != "seed"}, f"--replay {path}")


# ---------------------------------------------------------------------------------------------------------
# model fingerprints and the causes of a replay that differs


def _model(tmp_path: Path, big: int = 5 << 20) -> Path:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / ".git").mkdir()
    rng = np.random.default_rng(0)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(rng.bytes(big))
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    (folder / "tokenizer" / "merges.txt").write_text("a b\n")
    (folder / "README.md").write_text("notes")
    (folder / ".git" / "HEAD").write_text("ref")
    return folder


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fingerprint_follows_the_files_not_their_place_or_notes(tmp_path):
    model = _model(tmp_path)
    first = model_fingerprint(model)
    assert set(first) == {"model_weights", "model_config"}
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)  # new place, new mtimes
    (copy / "README.md").write_text("other notes")
    (copy / ".git" / "HEAD").write_text("other")
    assert model_fingerprint(copy) == first

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    for offset in (0, 1 << 20, (5 << 20) - 1):  # the first MiB, the first sampled block after it, the last MiB
        _flip(weights, offset)
        changed = model_fingerprint(model)
        assert changed["model_weights"] != first["model_weights"], offset
        assert changed["model_config"] == first["model_config"]
        _flip(weights, offset)
    assert model_fingerprint(model) == first
    (model / "unet" / "config.json").write_text('{"a": 2}')
    changed = model_fingerprint(model)
    assert changed["model_config"] != first["model_config"] and changed["model_weights"] == first["model_weights"]


def test_fingerprint_of_a_single_file_with_its_tokenizer(tmp_path):
    model = _model(tmp_path, big=1000)
    single = model / "unet" / "diffusion_pytorch_model.safetensors"
    a = model_fingerprint(single, model / "tokenizer")
    (model / "tokenizer" / "merges.txt").write_text("a c\n")
    b = model_fingerprint(single, model / "tokenizer")
    assert a["model_weights"] == b["model_weights"] and a["model_config"] != b["model_config"]


def test_replay_differences_name_the_real_cause():
    from diffusekit import __version__

    recorded = {"model_weights": "a", "model_config": "c", "image_sha256": "i", "device": "cuda:0", "batch_size": 4,
                "diffusekit_version": __version__}  # fmt: skip
    same = {"model_weights": "a", "model_config": "c", "image_sha256": "i", "device": "cuda:0", "batch_size": 1}
    assert replay_differences(recorded, same)[:-1] == []  # only the batch it was made in
    assert "batch of 4" in replay_differences(recorded, same)[-1]
    causes = replay_differences({**recorded, "batch_size": 1}, {**same, "model_weights": "b", "device": "cpu"})
    assert causes == ["the model's weights differ from the ones that made this image",
                      "it was made on cuda:0, replayed on cpu"]  # fmt: skip
    assert replay_differences({"device": "cpu"}, {"device": "cpu", "model_weights": "x"}) == []  # nothing recorded
    assert "diffusekit 0.0.1" in replay_differences({"diffusekit_version": "0.0.1"}, {})[0]


# ---------------------------------------------------------------------------------------------------------
# inputs and the checks against a model


def _save_16bit_grey(path: Path, value: int, size: tuple[int, int] = (16, 16)) -> None:
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)).save(path)  # opens as I;16 (or I)


def test_16_bit_greyscale_inputs_keep_their_brightness(tmp_path):
    _save_16bit_grey(tmp_path / "image.png", 32768)
    _save_16bit_grey(tmp_path / "mask.png", 16384)  # a quarter grey: keep (< 0.5), not repaint
    with Image.open(tmp_path / "mask.png") as im:
        assert im.mode.startswith("I")
    r = Recipe.from_dict({**BODY, "mode": "inpaint", "image": str(tmp_path / "image.png"),
                          "mask": str(tmp_path / "mask.png")})  # fmt: skip
    for size in (None, (24, 8)):
        inputs = load_inputs(r, size)
        image, mask = inputs["image"], inputs["mask"]
        assert image.shape == (1, 3, 16, 16) if size is None else (1, 3, 8, 24)
        assert mask.shape[2:] == image.shape[2:]
        torch.testing.assert_close(image, torch.full_like(image, 32768 / 65535), atol=1e-4, rtol=0)
        torch.testing.assert_close(mask, torch.full_like(mask, 16384 / 65535), atol=1e-4, rtol=0)


def test_inputs_of_different_sizes_name_both_fields(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
    Image.new("L", (24, 24)).save(tmp_path / "mask.png")
    r = Recipe.from_dict({**BODY, "mode": "inpaint", "image": str(tmp_path / "image.png"),
                          "mask": str(tmp_path / "mask.png")})  # fmt: skip
    with pytest.raises(ConfigError, match="field 'mask' is 24x24 but field 'image' is 16x16"):
        load_inputs(r, None)
    with pytest.raises(ConfigError, match=r"^--image .*absent.png: file not found"):
        load_inputs(r.replace(image=str(tmp_path / "absent.png")), None, lambda f: f"--{f}")


def _fake_model(sampler: str = "pndm", timesteps: int = 1000, multiple: int = 64):
    """What resolve() reads of a StableDiffusion: the sampler config, the size rules and the native size."""
    return SimpleNamespace(
        sampler_config=SamplerConfig(sampler=sampler, num_train_timesteps=timesteps),
        latent_multiple=multiple,
        codec=SimpleNamespace(downsample_factor=8),
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=64, downsample_factor=multiple // 8)),
    )


def test_resolve_checks_the_recipe_against_the_model():
    r = Recipe.from_dict(BODY)
    resolved = resolve(r, _fake_model())
    assert (resolved.sampler, resolved.width, resolved.height, resolved.inputs) == ("pndm", 512, 512, {})
    assert resolve(r.replace(sampler="ddim"), _fake_model()).sampler == "ddim"
    name = {"eta": "--eta", "sampler": "--sampler", "steps": "--steps", "width": "--size"}.get
    with pytest.raises(ConfigError, match=r"^--eta applies to the ddim sampler only; this model's own sampler is "
                                          r"pndm \(set --sampler to ddim\)"):  # fmt: skip
        resolve(r.replace(eta=0.5), _fake_model(), name)
    with pytest.raises(ConfigError, match=r"^--steps must be at most 100 for this model"):
        resolve(r.replace(steps=101), _fake_model(timesteps=100), name)
    with pytest.raises(ConfigError, match=r"^--size 520x512: width and height must be multiples of 64"):
        resolve(r.replace(width=520, height=512), _fake_model(), name)
    # a sampler's own rule, raised with the library's parameter name, reaches the caller in its words
    with pytest.raises(ConfigError, match=r"^--steps 60 must be <= original_inference_steps=50"):
        resolve(r.replace(sampler="lcm", steps=60), _fake_model(), name)


def test_image_at_its_own_size_must_fit_the_model(tmp_path):
    Image.new("RGB", (72, 64)).save(tmp_path / "in.png")
    r = Recipe.from_dict({**BODY, "mode": "img2img", "image": str(tmp_path / "in.png")})
    with pytest.raises(ConfigError, match=r"field 'image' is 72x64 pixels, but its width and height must be "
                                          r"multiples of 64 .*; set field 'width' to resize it"):  # fmt: skip
        resolve(r, _fake_model())
    resolved = resolve(r.replace(width=128, height=64), _fake_model())
    assert resolved.inputs["image"].shape == (1, 3, 64, 128)
    assert os.path.exists(tmp_path / "in.png")


# ---------------------------------------------------------------------------------------------------------
# sampler names, Karras sigmas, LoRAs, other tools' parameters text


@pytest.mark.parametrize(
    ("typed", "sampler", "karras"),
    [("DPM++ 2M Karras", "dpmpp_2m", True), ("dpm++ 2m karras", "dpmpp_2m", True), ("DPM++ 2M", "dpmpp_2m", False),
     ("Euler a", "euler_ancestral", False), ("k_euler_a", "euler_ancestral", False), ("DPM2 Karras", "kdpm2", True),
     ("PLMS", "pndm", False), ("UniPC", "unipc", False), ("LCM", "lcm", False), ("Heun", "heun", False),
     ("DDPM", "ddpm", False), ("DDIM", "ddim", False), ("Euler", "euler", False),
     ("euler-a", "euler_ancestral", None), ("dpmpp_2m", "dpmpp_2m", None), ("euler", "euler", None)],
)  # fmt: skip
def test_web_ui_sampler_names_set_the_sampler_and_its_grid(typed, sampler, karras):
    r = Recipe.from_dict({**BODY, "sampler": typed})
    assert (r.sampler, r.karras) == (sampler, karras)  # our own names keep the model's own grid (None)


def test_karras_reaches_the_grid_and_the_metadata():
    resolved = resolve(Recipe.from_dict({**BODY, "sampler": "DPM++ 2M Karras"}), _fake_model())
    assert (resolved.sampler, resolved.karras) == ("dpmpp_2m", True)
    assert resolved.sampler_config(_fake_model()).karras_sigmas
    plain = resolve(Recipe.from_dict({**BODY, "sampler": "DPM++ 2M"}), _fake_model())
    assert (plain.sampler, plain.karras) == ("dpmpp_2m", False)
    # our own name keeps the model's grid: a model whose scheduler asks for Karras sigmas keeps them ...
    karras_model = _fake_model()
    karras_model.sampler_config = SamplerConfig(sampler="dpmpp_2m", karras_sigmas=True)
    assert resolve(Recipe.from_dict({**BODY, "sampler": "dpmpp_2m"}), karras_model).karras
    # ... the web UI's plain name does not; a sampler without sigmas never reports them
    assert not resolve(Recipe.from_dict({**BODY, "sampler": "DPM++ 2M"}), karras_model).karras
    assert not resolve(Recipe.from_dict({**BODY, "sampler": "ddim"}), karras_model).karras
    with pytest.raises(ConfigError, match=r"field 'karras' \(this model's own sampler is pndm\): Karras sigmas apply"):
        resolve(Recipe.from_dict({**BODY, "karras": True}), _fake_model())
    r = Recipe.from_dict({**BODY, "sampler": "DPM++ 2M Karras"})
    meta = to_metadata(r, width=64, height=64, sampler="dpmpp_2m", karras=True, provenance={})
    assert "Sampler: DPM++ 2M Karras," in png_text(meta)[PARAMETERS_KEY]
    assert (meta["sampler"], meta["karras"]) == ("dpmpp_2m", True)
    assert recipe_from_metadata(json.loads(json.dumps(meta)), "x") == r.replace(width=64, height=64)
    unipc = to_metadata(r.replace(sampler="unipc"), width=64, height=64, sampler="unipc", karras=True, provenance={})
    assert "Sampler: UniPC, Schedule type: Karras," in png_text(unipc)[PARAMETERS_KEY]


def test_a_version_1_png_replays_on_the_models_own_grid_without_loras():
    meta = to_metadata(Recipe.from_dict(BODY), width=64, height=64, sampler="pndm", provenance={})
    old = {k: v for k, v in meta.items() if k not in ("karras", "loras")} | {"format_version": 1}
    r = recipe_from_metadata(old, "x")
    assert (r.karras, r.loras) == (None, ())
    with pytest.raises(ConfigError, match="the metadata lacks karras, loras"):  # version 2 must have them
        recipe_from_metadata({**old, "format_version": 2}, "x")


def test_lcm_without_a_guidance_gets_guidance_1():
    assert Recipe.from_dict({**BODY, "sampler": "LCM"}).guidance == 1.0
    assert Recipe.from_dict({**BODY, "sampler": "LCM", "guidance": 3}).guidance == 3.0
    assert Recipe.from_dict({**BODY, "sampler": "euler"}).guidance == 7.5


def test_loras_round_trip_through_json_and_metadata(tmp_path):
    loras = [{"path": "/l/style.safetensors", "weight": 1},
             {"path": "/l/detail.safetensors", "weight": -0.5, "sha256": "a" * 64}]  # fmt: skip
    r = Recipe.from_dict({**BODY, "loras": loras})
    assert r.loras[0].weight == 1.0 and isinstance(r.loras[0].weight, float)
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    text = png_text(to_metadata(r, width=64, height=64, sampler="pndm", provenance={}))
    assert 'LoRA: "style.safetensors: 1.0, detail.safetensors: -0.5"' in text[PARAMETERS_KEY]


def test_check_lora_files_hashes_and_refuses_another_file_under_the_same_name(tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"one")
    from diffusekit.pipelines.recipe import check_lora_files

    (lora,) = check_lora_files(Recipe.from_dict({**BODY, "loras": [{"path": str(path)}]}).loras)
    assert lora.sha256 == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"  # sha256sum of b"one"
    assert check_lora_files([lora]) == (lora,)
    path.write_bytes(b"two")
    with pytest.raises(ConfigError, match=r"style.safetensors: a different file under the same name: its SHA-256 "
                                          r"is 3fc4ccfe7458\.\.\., the image was made with 7692c3ad3540"):  # fmt: skip
        check_lora_files([lora])
    path.unlink()
    with pytest.raises(ConfigError, match=r"^--lora .*style.safetensors: no such file$"):
        check_lora_files([lora], lambda f: "--lora")


WEB_UI_TEXT = """a lighthouse at dusk, <lora:film grain:0.7> oil
second line
Negative prompt: blurry, low quality
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: \
abc123, Model: dreamshaper, Clip skip: 2, Lora hashes: "film grain: 0123456789ab", Version: v1.9.0"""


def test_parameters_of_another_tool_read_as_recipe_fields():
    from diffusekit.pipelines.recipe import recipe_from_parameters

    p = recipe_from_parameters(WEB_UI_TEXT.replace("\\\n", ""), "--replay x.png")
    assert p.fields == {"prompt": "a lighthouse at dusk,  oil\nsecond line", "negative_prompt": "blurry, low quality",
                        "steps": 20, "sampler": "euler_ancestral", "karras": False, "guidance": 6.5, "seed": 1234,
                        "width": 512, "height": 768}  # fmt: skip
    assert p.loras == {"film grain": 0.7}
    assert p.unused == ["Clip skip", "Lora hashes"]
    karras = recipe_from_parameters("x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7", "w")
    assert (karras.fields["sampler"], karras.fields["karras"]) == ("dpmpp_2m", True)
    old_style = recipe_from_parameters("x\nSteps: 20, Sampler: DPM++ 2M Karras, Eta: 0.5", "w")
    assert (old_style.fields["sampler"], old_style.fields["karras"], old_style.unused) == ("dpmpp_2m", True, ["Eta"])
    for text, match in [("no settings", "has no 'Steps: N, Sampler: ...' line"),
                        ("x\nSteps: 20, Sampler: DPM++ 3M SDE", "'Sampler' must be a sampler name"),
                        ("x\nSteps: 20, Sampler: DDIM, Schedule type: Karras", "'Schedule type' Karras: Karras sigmas"),
                        ("x\nSteps: 20, Schedule type: Exponential", "'Schedule type' 'Exponential' is not supported"),
                        ("x\nSteps: twenty", "'Steps' 'twenty' is not a number"),
                        ("x\nSteps: 20, Size: big", "'Size' must be WIDTHxHEIGHT")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            recipe_from_parameters(text, "w")
