"""``--lora FILE[:WEIGHT]``, the web UI's sampler names (Karras sigmas), LCM and other tools' PNGs in
``diffusekit txt2img | img2img`` on the tiny reference pipeline and its LoRA fixture."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_running import run
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from diffusekit.cli.main import main
from diffusekit.pipelines.recipe import PARAMETERS_KEY, read_png_metadata

BASE = ["--steps", "2", "--size", "16x16", "--seed", "3", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def kohya(fixtures_dir: Path, tmp_path_factory) -> Path:
    """A copy of the fixture's kohya-format LoRA (tests change and remove their copies)."""
    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    shutil.copyfile(fixtures_dir / "pipelines" / "lora" / "kohya.safetensors", path)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def txt2img(sd_folder: Path, out: Path, capsys, *extra: str) -> Path:
    code, written, err = run(["txt2img", "--model", str(sd_folder), "a red fox", *BASE, "--out", str(out), *extra],
                             capsys)  # fmt: skip
    assert code == 0, err
    (path,) = written
    return path


@pytest.fixture(scope="module")
def plain(sd_folder, tmp_path_factory) -> Path:
    """The image without a LoRA, DPM++ 2M on its own grid."""
    out = tmp_path_factory.mktemp("plain")
    assert main(["txt2img", "--model", str(sd_folder), "a red fox", *BASE, "--out", str(out),
                 "--sampler", "DPM++ 2M"]) == 0  # fmt: skip
    return next(out.glob("*.png"))


# ---------------------------------------------------------------------------------------------------------
# sampler names


def test_dpmpp_2m_karras_runs_on_karras_sigmas_and_is_recorded(sd_folder, plain, tmp_path, capsys):
    path = txt2img(sd_folder, tmp_path, capsys, "--sampler", "DPM++ 2M Karras")
    meta = read_png_metadata(path)
    assert (meta["sampler"], meta["karras"]) == ("dpmpp_2m", True)
    with Image.open(path) as im:
        assert "Sampler: DPM++ 2M Karras," in im.info[PARAMETERS_KEY]
    assert read_png_metadata(plain)["karras"] is False
    assert np.abs(pixels(path) - pixels(plain)).max() > 0  # the grid changed the image
    code, (again,), err = run(["txt2img", "--replay", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "replay: identical" in err
    assert read_png_metadata(again)["karras"] is True


def _web_ui_png(tmp_path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    path = tmp_path / "webui.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


def test_another_tools_png_replays_with_its_settings_and_the_model_given(sd_folder, kohya, tmp_path, capsys):
    text = ("a red fox <lora:style:0.6>\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 5, "
            "Seed: 11, Size: 16x16, Model hash: abc, Model: x, Clip skip: 2")  # fmt: skip
    png = _web_ui_png(tmp_path, text)
    code, _, err = run(["txt2img", "--replay", str(png), "--out", str(tmp_path / "a"), "--quiet"], capsys)
    assert code == 2 and "was made by another tool: its 'parameters' text names no model file; pass --model" in err
    code, _, err = run(["txt2img", "--replay", str(png), "--model", str(sd_folder), "--out", str(tmp_path / "b")],
                       capsys)  # fmt: skip
    assert code == 2 and "its prompt uses the LoRA 'style' (<lora:style:0.6>); pass --lora FILE" in err
    code, (path,), err = run(["txt2img", "--replay", str(png), "--model", str(sd_folder), "--lora", str(kohya),
                              "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert code == 0, err
    meta = read_png_metadata(path)
    assert (meta["sampler"], meta["karras"], meta["steps"], meta["guidance"], meta["seed"]) == (
        "euler_ancestral", False, 2, 5.0, 11)  # fmt: skip
    assert (meta["prompt"], meta["negative_prompt"]) == ("a red fox", "blurry")
    assert [(x["path"], x["weight"]) for x in meta["loras"]] == [(str(kohya), 0.6)]
    assert "note: --replay" in err and "not used: Clip skip" in err
    bad = _web_ui_png(tmp_path, "x\nSteps: 2, Sampler: DPM++ 3M SDE, Seed: 1")
    code, _, err = run(["txt2img", "--replay", str(bad), "--model", str(sd_folder), "--out", str(tmp_path)], capsys)
    assert code == 2 and "'Sampler' must be a sampler name: 'Euler'" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# --lora


def test_lora_is_applied_recorded_and_replayed(sd_folder, kohya, plain, tmp_path, capsys):
    path = txt2img(sd_folder, tmp_path / "a", capsys, "--sampler", "DPM++ 2M", "--lora", f"{kohya}:0.8")
    (lora,) = read_png_metadata(path)["loras"]
    assert lora == {"path": str(kohya), "weight": 0.8, "sha256": hashlib.sha256(kohya.read_bytes()).hexdigest()}
    assert np.abs(pixels(path) - pixels(plain)).max() > 0
    with Image.open(path) as im:
        assert 'LoRA: "style.safetensors: 0.8"' in im.info[PARAMETERS_KEY]
    off = txt2img(sd_folder, tmp_path / "b", capsys, "--sampler", "DPM++ 2M", "--lora", f"{kohya}:0")
    assert np.array_equal(pixels(off), pixels(plain))  # weight 0: the adapter adds exactly nothing
    code, (again,), err = run(["txt2img", "--replay", str(path), "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "replay: identical" in err, err
    # the file moved: --lora gives its new place, the recorded weight is kept and the replay is the same image
    moved = tmp_path / "elsewhere" / kohya.name
    moved.parent.mkdir()
    shutil.copyfile(kohya, moved)
    code, (again,), err = run(["txt2img", "--replay", str(path), "--lora", str(moved), "--out", str(tmp_path / "d")],
                              capsys)  # fmt: skip
    assert code == 0 and "replay: identical" in err, err
    assert read_png_metadata(again)["loras"][0]["weight"] == 0.8
    # a different file under the same name, or none at all: refused before the model loads
    data = bytearray(moved.read_bytes())
    data[-1] ^= 1
    moved.write_bytes(bytes(data))
    code, written, err = run(["txt2img", "--replay", str(path), "--lora", str(moved), "--out", str(tmp_path / "e")],
                             capsys)  # fmt: skip
    assert code == 2 and not written and len(err.splitlines()) == 1
    assert f"error: --lora {moved}: a different file under the same name: its SHA-256 is" in err
    moved.unlink()
    code, written, err = run(["txt2img", "--replay", str(path), "--lora", str(moved), "--out", str(tmp_path / "f")],
                             capsys)  # fmt: skip
    assert code == 2 and not written and f"--lora {moved}: no such file" in err


def test_a_changed_lora_file_refuses_the_replay(sd_folder, kohya, tmp_path, capsys):
    lora = tmp_path / "mine.safetensors"
    shutil.copyfile(kohya, lora)
    path = txt2img(sd_folder, tmp_path / "a", capsys, "--lora", str(lora))
    lora.write_bytes(lora.read_bytes()[:-1] + b" ")
    code, written, err = run(["txt2img", "--replay", str(path), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and not written
    assert f"error: --replay {path}: field 'loras' {lora}: a different file under the same name" in err
    lora.unlink()
    code, written, err = run(["txt2img", "--replay", str(path), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and f"--replay {path}: field 'loras' {lora}: no such file" in err


def _sdxl_lora(path: Path) -> Path:
    """A kohya LoRA for SDXL's second text encoder (lora_te2_), which an SD-1 model does not have."""
    stem = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32), f"{stem}.lora_up.weight": torch.zeros(32, 2),
               f"{stem}.alpha": torch.tensor(2.0)}, str(path))  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{kohya}:abc", "--lora '{kohya}:abc': the weight 'abc' is not a number; write FILE or FILE:WEIGHT"),
        ("{kohya}:inf", "--lora '{kohya}:inf': the weight must be a finite number from -10000 to 10000, got inf"),
        ("{kohya}:nan", "the weight must be a finite number"),
        ("{kohya}:1e9", "the weight must be a finite number"),
        ("{tmp}/missing.safetensors:0.5", "--lora {tmp}/missing.safetensors: no such file"),
        (":0.5", "--lora ':0.5': no file named"),
        ("{sdxl}", "--lora {sdxl}: has adapters for text_encoder_2"),
    ],
)
def test_bad_lora_input_is_a_one_line_error_before_any_image(sd_folder, kohya, tmp_path, capsys, value, expected):
    sdxl = _sdxl_lora(tmp_path / "sdxl.safetensors")
    fill = {"kohya": kohya, "tmp": tmp_path, "sdxl": sdxl}
    out = tmp_path / "out"
    code, written, err = run(["txt2img", "--model", str(sd_folder), "a", *BASE, "--out", str(out), "--lora",
                              value.format(**fill)], capsys)  # fmt: skip
    assert code == 2 and not written and not out.exists()
    assert err.startswith("diffusekit txt2img: error: ") and len(err.splitlines()) == 1, err
    assert expected.format(**fill) in err


def test_img2img_takes_loras(sd_folder, kohya, plain, tmp_path, capsys):
    code, (path,), err = run(["img2img", "--model", str(sd_folder), "a", "--image", str(plain), "--steps", "2",
                              "--lora", f"{kohya}:0.5", "--out", str(tmp_path), "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    assert read_png_metadata(path)["loras"][0]["weight"] == 0.5


# ---------------------------------------------------------------------------------------------------------
# LCM


def test_lcm_in_a_few_steps_uses_guidance_1_and_says_so(sd_folder, tmp_path, capsys):
    code, (path,), err = run(["txt2img", "--model", str(sd_folder), "a", "--steps", "2", "--size", "16x16",
                              "--sampler", "LCM", "--out", str(tmp_path / "a")], capsys)  # fmt: skip
    assert code == 0, err
    assert "note: --sampler LCM: using --guidance 1, the guidance latent consistency models are made for" in err
    meta = read_png_metadata(path)
    assert (meta["sampler"], meta["guidance"], meta["steps"]) == ("lcm", 1.0, 2)
    with Image.open(path) as im:
        assert "Sampler: LCM, CFG scale: 1.0," in im.info[PARAMETERS_KEY]
    code, (path,), err = run(["txt2img", "--model", str(sd_folder), "a", "--steps", "2", "--size", "16x16",
                              "--sampler", "lcm", "--guidance", "3", "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert code == 0 and "note:" not in err and read_png_metadata(path)["guidance"] == 3.0


def test_help_lists_the_web_ui_names_and_lora(capsys):
    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--lora FILE[:WEIGHT]", "'DPM++ 2M Karras'", "Euler a", "UniPC", "LCM uses --guidance 1"):
        assert needle in text, needle


def test_sdxl_generates_from_the_cli_and_refuses_an_sd1_lora(fixtures_dir, kohya, tmp_path, capsys):
    xl = fixtures_dir / "pipelines" / "stable_diffusion_xl"
    argv = ["txt2img", "--model", str(xl), "a", "--steps", "2", "--size", "64", "--sampler", "Euler a", "--quiet"]
    code, (path,), err = run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, (again,), err = run(["txt2img", "--replay", str(path), "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and "replay: identical" in err
    code, written, err = run([*argv, "--out", str(tmp_path / "c"), "--lora", str(kohya)], capsys)
    assert code == 2 and not written and err.startswith(f"diffusekit txt2img: error: --lora {kohya}: ")
    code, _, err = run(["inpaint", "--model", str(xl), "a", "--image", str(path), "--mask", str(path), "--steps",
                        "2", "--out", str(tmp_path / "d"), "--quiet"], capsys)  # fmt: skip
    assert code == 2 and "inpainting with an SDXL model is not supported" in err


def _upscaler_lora(model: Path, path: Path) -> Path:
    """A LoRA on the first Linear layer of the upscaler's text encoder, written in the kohya layout."""
    from diffusekit.io.lora import save_lora
    from diffusekit.networks.lora import LowRank
    from diffusekit.pipelines.loading import load_pipeline

    encoder = load_pipeline(model).text_encoder
    name, layer = next((n, m) for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear))
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2, generator=g)
    update = LowRank(down, up, 2.0)
    save_lora({"text_encoder": {name: update}}, path)
    return path


def test_upscale_takes_loras_records_and_replays_them(fixtures_dir, kohya, tmp_path, capsys):
    model = fixtures_dir / "pipelines" / "stable_diffusion_upscale"
    lora = _upscaler_lora(model, tmp_path / "up.safetensors")
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(image)
    argv = ["upscale", "--model", str(model), str(image), "--prompt", "a cat", "--steps", "1", "--quiet"]
    code, (plain,), err = run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, (path,), err = run([*argv, "--out", str(tmp_path / "b"), "--lora", f"{lora}:2"], capsys)
    assert code == 0, err
    assert [(x["path"], x["weight"]) for x in read_png_metadata(path)["loras"]] == [(str(lora), 2.0)]
    assert np.abs(pixels(path) - pixels(plain)).max() > 0
    code, _, err = run(["upscale", "--replay", str(path), "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "replay: identical" in err, err
    lora.write_bytes(lora.read_bytes()[:-1] + b" ")
    code, written, err = run(["upscale", "--replay", str(path), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and not written and "field 'loras'" in err and "a different file under the same name" in err
    code, written, err = run([*argv, "--out", str(tmp_path / "e"), "--lora", f"{kohya}:x"], capsys)
    assert code == 2 and not written and "the weight 'x' is not a number" in err
    code, written, err = run([*argv, "--out", str(tmp_path / "f"), "--lora", str(kohya)], capsys)
    assert code == 2 and not written and err.startswith(f"diffusekit upscale: error: --lora {kohya}: ")
