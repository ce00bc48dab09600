"""``diffusekit txt2img | img2img | inpaint`` on the tiny reference pipelines: PNG metadata, --replay, errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_running import run
from PIL import Image, PngImagePlugin

from diffusekit.cli import generate
from diffusekit.cli.main import main
from diffusekit.errors import ConfigError, OutputError
from diffusekit.io.png import PngWriter
from diffusekit.pipelines.recipe import METADATA_KEY, parse_size, read_png_metadata, recipe_from_metadata


def settings_from_metadata(meta: dict, path: Path):
    return recipe_from_metadata(meta, f"--replay {path}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def inpaint_folder(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_inpaint"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def txt2img_run(sd_folder, tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("txt2img")
    argv = ["txt2img", "--model", str(sd_folder), "a red fox in the snow", "--negative", "blurry", "--n", "2",
            "--steps", "2", "--size", "16x16", "--seed", "7", "--sampler", "euler-a", "--out", str(out),
            "--quiet"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert not [str(w.message) for w in caught]  # nothing for the CLI's warning hook to print
    return out, sorted(out.glob("*.png"))


def test_txt2img_writes_pngs_with_metadata_that_round_trips(txt2img_run, sd_folder):
    out, paths = txt2img_run
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    meta = read_png_metadata(paths[1])
    s = settings_from_metadata(meta, paths[1])
    assert (s.mode, s.prompt, s.negative_prompt, s.seed, s.steps, s.guidance) == (
        "txt2img", "a red fox in the snow", "blurry", 8, 2, 7.5)  # fmt: skip
    assert (s.sampler, s.width, s.height, s.eta, s.strength) == ("euler_ancestral", 16, 16, None, None)
    assert Path(s.model) == sd_folder.absolute() and meta["diffusekit_version"]
    with Image.open(paths[1]) as im:
        readable = im.info["parameters"]
    assert readable.startswith("a red fox in the snow\nNegative prompt: blurry\n")
    assert "Seed: 8" in readable and "Sampler: Euler a," in readable and "Size: 16x16" in readable


def test_replay_reproduces_bit_for_bit_and_never_overwrites(txt2img_run, capsys):
    out, paths = txt2img_run
    code, written, err = run(["txt2img", "--replay", str(paths[1])], capsys)
    assert code == 0 and len(written) == 1
    assert written[0].parent == out and written[0].name.endswith("-8.png") and written[0] not in paths
    assert np.array_equal(pixels(written[0]), pixels(paths[1]))
    assert "identical" in err
    assert all(p.exists() for p in paths)
    written[0].unlink()


def test_image_i_of_a_run_equals_its_seed_alone(txt2img_run, sd_folder, tmp_path, capsys):
    _, paths = txt2img_run
    code, written, _ = run(["txt2img", "--model", str(sd_folder), "a red fox in the snow", "--negative", "blurry",
                            "--steps", "2", "--size", "16", "--seed", "8", "--sampler", "euler_a", "--out",
                            str(tmp_path), "--quiet"], capsys)  # fmt: skip
    assert code == 0
    assert np.array_equal(pixels(written[0]), pixels(paths[1]))


def test_img2img_and_inpaint_run_and_replay(txt2img_run, sd_folder, inpaint_folder, tmp_path, capsys):
    _, paths = txt2img_run
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, made, _ = run(["img2img", "--model", str(sd_folder), "an oil painting", "--image", str(paths[0]),
                         "--strength", "0.5", "--steps", "4", "--sampler", "ddim", "--eta", "0.5",
                         "--out", str(tmp_path / "i2i"), "--quiet"], capsys)  # fmt: skip
    assert code == 0 and len(made) == 1
    meta = read_png_metadata(made[0])
    assert (meta["mode"], meta["strength"], meta["eta"], meta["width"]) == ("img2img", 0.5, 0.5, 16)
    assert len(meta["image_sha256"]) == 64
    code, again, _ = run(["img2img", "--replay", str(made[0])], capsys)
    assert code == 0 and np.array_equal(pixels(again[0]), pixels(made[0]))
    code, other, err = run(["img2img", "--replay", str(made[0]), "--sampler", "euler", "--quiet"], capsys)
    assert code == 0, err  # the recorded eta is dropped with the ddim sampler
    assert read_png_metadata(other[0])["eta"] is None and read_png_metadata(other[0])["sampler"] == "euler"

    for folder in (inpaint_folder, sd_folder):  # 9-channel inpainting U-Net, and mask blending
        code, made, _ = run(["inpaint", "--model", str(folder), "a cat", "--image", str(paths[0]), "--mask",
                             str(tmp_path / "mask.png"), "--steps", "2", "--out", str(tmp_path / folder.name),
                             "--quiet"], capsys)  # fmt: skip
        assert code == 0 and len(made) == 1
        assert read_png_metadata(made[0])["mask"] == str((tmp_path / "mask.png").absolute())


def test_png_writer_takes_the_next_free_name(tmp_path):
    (tmp_path / "00004-1.png").write_bytes(b"mine")
    writer = PngWriter(tmp_path)
    image = Image.new("RGB", (8, 8))
    first = writer.write(image, 3, {"k": "v"})
    assert first.name == "00005-3.png"
    (tmp_path / "00006-3.png").write_bytes(b"someone else's")  # appears between two writes
    second = writer.write(image, 3, {})
    assert second.name == "00007-3.png"
    assert (tmp_path / "00004-1.png").read_bytes() == b"mine"
    assert (tmp_path / "00006-3.png").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00004-1.png", "00005-3.png", "00006-3.png", "00007-3.png"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--size", "22x16"], "--size must be WIDTHxHEIGHT in pixels (or one number for a square), each a multiple "
                              "of 4 from 8 to 16384, e.g. 512x768; got '22x16' (22 is not allowed)"),
        (["--size", "big"], "--size must be WIDTHxHEIGHT"),
        (["--size", "-16x16"], "--size must be WIDTHxHEIGHT in pixels (or one number for a square), each a multiple "
                               "of 4 from 8 to 16384, e.g. 512x768; got '-16x16' (-16 is not allowed)"),
        (["--size", "16x0"], "got '16x0' (0 is not allowed)"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000]"),
        (["--guidance", "-1"], "--guidance must be a finite number in [0.0, 1000.0]"),
        (["--guidance", "-1e3"], "--guidance must be a finite number in [0.0, 1000.0]"),
        (["--guidance", "inf"], "--guidance must be a finite number"),
        (["--sampler", "rk4"], "--sampler must be a sampler name: 'Euler', 'Euler a',"),
        (["--seed", "-1"], "--seed must be an integer in [0,"),
        (["--eta", "0.3"], "--eta applies to the ddim sampler only"),
        (["--n", "0"], "--n must be an integer in [1, 10000]"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_txt2img_bad_input_is_a_one_line_error(sd_folder, tmp_path, capsys, extra, expected):
    code, written, err = run(["txt2img", "--model", str(sd_folder), "a", "--steps", "1", "--out", str(tmp_path),
                              "--quiet", *extra], capsys)  # fmt: skip
    assert code == 2 and not written
    assert expected in err
    assert "Traceback" not in err


def test_other_bad_inputs(sd_folder, tmp_path, capsys):
    png = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(png)
    Image.new("L", (24, 24)).save(tmp_path / "mask.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    common = ["--model", str(sd_folder), "--out", str(tmp_path / "out"), "--quiet", "--steps", "2"]
    cases = [
        (["txt2img", *common], "no prompt given"),
        (["img2img", *common, "a", "--image", str(png), "--strength", "1.5"],
         "--strength must be a finite number in [0.0, 1.0]"),
        (["img2img", *common, "a"], "--image FILE is required"),
        (["inpaint", *common, "a", "--image", str(png), "--mask", str(tmp_path / "mask.png")],
         "--mask is 24x24 but --image is 16x16"),
        (["txt2img", "--model", str(tmp_path / "nowhere"), "a", "--out", str(tmp_path)], "no such folder or file"),
        (["img2img", *common, "a", "--image", str(tmp_path / "mask.png"), "--size", "14x14"], "multiple of 4"),
        (["img2img", *common, "a", "--image", str(tmp_path / "small.png")], "--image is 10x10 pixels"),
        # messages name the options, not the library's parameters (strength=, steps=, num_inference_steps=)
        (["img2img", *common, "a", "--image", str(png), "--strength", "0.2"],
         "--strength 0.2 with --steps 2 runs no denoising step"),
        (["img2img", *common, "a", "--image", str(png), "--strength", "0"], "raise --strength or --steps"),
        (["txt2img", *common, "x" * 10_001], "PROMPT must be a string of at most 10000 characters"),
        (["txt2img", *common, "a", "--negative", "x" * 10_001], "--negative must be a string of at most"),
        (["txt2img", *common, "a", "--eta", "0.5"], "--eta applies to the ddim sampler only; this model's own "
                                                   "sampler is pndm (set --sampler to ddim)"),
        (["img2img", *common, "a", "--image", str(tmp_path / "absent.png")], "--image"),
        (["inpaint", *common, "a", "--image", str(png), "--mask", str(tmp_path)], "--mask"),
        (["txt2img", *common, "a", "--sampler", "lcm", "--steps", "60"],
         "--steps 60 must be <= original_inference_steps=50 for a consistency model"),
        (["txt2img", *common, "a", "--tokenizer", str(tmp_path / "none")], f"--tokenizer {tmp_path / 'none'}: no such"),
    ]  # fmt: skip
    for argv, expected in cases:
        code, written, err = run(argv, capsys)
        assert code == 2 and not written, argv
        assert expected in err, (argv, err)
        assert not re.search(r"\b(num_inference_steps|steps|strength|guidance_scale|eta)=", err), err
        assert "Traceback" not in err and "Warning" not in err, err
    assert not (tmp_path / "out").exists()  # nothing created for a failed run


def _png_with(tmp_path: Path, name: str, text: dict[str, str]) -> Path:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    path = tmp_path / name
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


def test_hostile_pngs_give_config_errors(txt2img_run, tmp_path, capsys):
    good = read_png_metadata(txt2img_run[1][0])
    not_png = tmp_path / "x.png"
    not_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 100)
    jpeg = tmp_path / "x.jpg"
    Image.new("RGB", (4, 4)).save(jpeg)

    def variant(**changes) -> str:
        return json.dumps({**good, **changes})

    cases = [
        (not_png, "not a readable PNG"),
        (jpeg, "not a PNG image"),
        (_png_with(tmp_path, "plain.png", {}), "has no 'diffusekit' metadata"),
        (_png_with(tmp_path, "json.png", {METADATA_KEY: "{not json"}), "not valid JSON"),
        (_png_with(tmp_path, "deep.png", {METADATA_KEY: "[" * 50_000 + "]" * 50_000}), "not valid JSON"),
        (_png_with(tmp_path, "list.png", {METADATA_KEY: "[1, 2]"}), "not a JSON object"),
        (_png_with(tmp_path, "fmt.png", {METADATA_KEY: variant(format_version=99)}), "unknown metadata format"),
        (_png_with(tmp_path, "steps.png", {METADATA_KEY: variant(steps="many")}), "field 'steps'"),
        (_png_with(tmp_path, "seed.png", {METADATA_KEY: variant(seed=-5)}), "field 'seed'"),
        (_png_with(tmp_path, "nan.png", {METADATA_KEY: variant(guidance=float("nan"))}), "field 'guidance'"),
        (_png_with(tmp_path, "size.png", {METADATA_KEY: variant(width=17)}), "field 'width'"),
        (_png_with(tmp_path, "huge.png", {METADATA_KEY: variant(height=10**9)}), "field 'height'"),
        (_png_with(tmp_path, "sampler.png", {METADATA_KEY: variant(sampler="rm -rf")}), "field 'sampler'"),
        (_png_with(tmp_path, "prompt.png", {METADATA_KEY: variant(prompt=["a"])}), "field 'prompt'"),
        (_png_with(tmp_path, "missing.png", {METADATA_KEY: json.dumps({"format": good["format"],
                                                                      "format_version": 1})}), "lacks"),
        (_png_with(tmp_path, "mode.png", {METADATA_KEY: variant(mode="img2img")}), "field 'strength'"),
        (_png_with(tmp_path, "inf.png", {METADATA_KEY: variant(guidance=float("inf"))}), "field 'guidance'"),
        (tmp_path / "absent.png", "file not found"),
    ]  # fmt: skip
    for path, expected in cases:
        with pytest.raises(ConfigError, match=None) as e:
            settings_from_metadata(read_png_metadata(path), path)
        assert expected in str(e.value), (path.name, str(e.value))
    code, written, err = run(["txt2img", "--replay", str(tmp_path / "steps.png"), "--out", str(tmp_path)], capsys)
    assert code == 2 and not written and "field 'steps'" in err and "Traceback" not in err


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    assert parse_size("64") == (64, 64)
    assert parse_size("28") == (28, 28)  # an f=4 VAE's digits
    with pytest.raises(ConfigError, match="multiple of 4"):
        parse_size("512x502")
    with pytest.raises(ConfigError, match=r"^--size must be WIDTHxHEIGHT .* from 8 to 16384"):
        parse_size("16384x16392", "--size")


def test_help_reads_like_a_manual(capsys):
    for command in ("txt2img", "img2img", "inpaint", "convert"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text, command
    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--tokenizer", "--negative", "--steps", "--guidance", "--sampler", "--eta",
                   "--seed", "--size", "--n", "--out", "--replay", "--quiet", "--allow-pickle", "default 25",
                   "pixels"):  # fmt: skip
        assert option in text, option


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")


def test_an_unusable_out_fails_before_the_model_loads(sd_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_model", _refuse_to_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        (blocker, f"--out {blocker}: is a file, not a folder"),
        (blocker / "sub", f"--out {blocker / 'sub'}: is inside {blocker}, which is a file, not a folder"),
    ]
    for out, expected in cases:
        code, written, err = run(["txt2img", "--model", str(sd_folder), "a", "--out", str(out), "--quiet"], capsys)
        assert code == 2 and not written and expected in err, err
    assert blocker.read_text() == "not a folder"


@contextlib.contextmanager
def _as_nobody():
    """Run the block with the effective uid of 'nobody' when we are root (root writes into read-only folders)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_read_only_out_fails_before_the_model_loads(sd_folder, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        read_only = Path(tmp) / "read-only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        missing_model = Path(tmp) / "no-model"  # if the model were looked at first, this would be the error
        with _as_nobody():
            for out in (read_only, read_only / "new"):
                code, written, err = run(["txt2img", "--model", str(missing_model), "a", "--out", str(out),
                                          "--quiet"], capsys)  # fmt: skip
                assert code == 2 and not written, err
                assert f"--out {out}: cannot" in err and "Permission denied" in err, err
        assert list(read_only.iterdir()) == []


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    code, written, err = run(["txt2img", "--model", str(tmp_path / "nowhere"), "a", "--out", str(out)], capsys)
    assert code == 2 and "no such folder or file" in err
    assert not (tmp_path / "new").exists()


def test_png_writer_prepare_and_discard(tmp_path):
    writer = PngWriter(tmp_path / "a" / "b", where="--out a/b")
    writer.prepare()
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []  # no probe left
    writer.discard()
    assert not (tmp_path / "a").exists()
    writer = PngWriter(tmp_path / "c")
    writer.write(Image.new("RGB", (8, 8)), 1, {})
    writer.discard()  # a folder holding an image stays
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["00000-1.png"]
    assert (tmp_path / "c" / "00000-1.png").stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(OutputError, match="is a file, not a folder"):
        PngWriter(tmp_path / "c" / "00000-1.png").prepare()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_replay_after_the_weights_changed_names_the_weights(sd_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(sd_folder, model)
    for p in model.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    code, made, _ = run(["txt2img", "--model", str(model), "a boat", "--size", "16x16", "--steps", "2", "--out",
                         str(tmp_path / "out"), "--quiet"], capsys)  # fmt: skip
    assert code == 0
    code, again, err = run(["txt2img", "--replay", str(made[0])], capsys)
    assert code == 0 and "identical" in err

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if k.startswith("conv_out") and k.endswith("weight"))
    tensors[key] = tensors[key] * 3
    save_file(tensors, str(weights))
    code, again, err = run(["txt2img", "--replay", str(made[0])], capsys)
    assert code == 0 and not np.array_equal(pixels(again[0]), pixels(made[0]))
    assert "warning: the model's weights differ from the ones that made this image" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"replay: differs from {made[0]}") and "the model's weights differ" in last, err
    assert "a different machine" not in err
