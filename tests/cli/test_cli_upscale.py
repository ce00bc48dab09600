"""``diffusekit upscale`` on the tiny x4-upscaler fixture: files and folders, any image mode, metadata, tiles,
never overwriting, errors that name the option, the output checked before the model loads, --help."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_running import run
from PIL import Image

from diffusekit.cli import upscale as upscale_cli
from diffusekit.cli.main import main
from diffusekit.pipelines.recipe import METADATA_KEY

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_upscale"


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)  # opens as I;16
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


FAST = ["--steps", "1", "--guidance", "1", "--quiet"]


def test_upscales_files_and_folders_with_metadata(model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _image(inputs / "a.png", size=(8, 8))
    _image(inputs / "b.jpg", size=(9, 7), seed=1)  # not multiples of the model's factor: padded, cropped back
    (inputs / "notes.txt").write_text("not an image")
    single = _image(tmp_path / "c.png", size=(4, 4), seed=2)
    out = tmp_path / "out"
    code, written, err = run(["upscale", "--model", str(model), str(inputs), str(single), "--out", str(out),
                              "--prompt", "a cat", "--noise-level", "30", "--seed", "5", *FAST], capsys)  # fmt: skip
    assert code == 0, err
    assert [p.name for p in written] == ["00000-5.png", "00001-6.png", "00002-7.png"]
    sizes = []
    for path in written:
        with Image.open(path) as im:
            sizes.append(im.size)
            meta = json.loads(im.info[METADATA_KEY])
        assert meta["mode"] == "upscale" and meta["noise_level"] == 30 and meta["prompt"] == "a cat"
        assert meta["image_sha256"] and meta["model_weights"] and meta["sampler"] == "ddim"
    assert sizes == [(32, 32), (36, 28), (16, 16)]

    # the same run again: new files beside the old ones, the same pixels (seed per input)
    code, again, err = run(["upscale", "--model", str(model), str(inputs), str(single), "--out", str(out),
                            "--prompt", "a cat", "--noise-level", "30", "--seed", "5", *FAST], capsys)  # fmt: skip
    assert code == 0, err
    assert [p.name for p in again] == ["00003-5.png", "00004-6.png", "00005-7.png"]
    for a, b in zip(written, again):
        with Image.open(a) as x, Image.open(b) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "I;16"])
def test_any_image_mode_is_converted_and_said(model, tmp_path, capsys, mode):
    path = _image(tmp_path / f"in-{mode.replace(';', '')}.png", mode)
    code, written, err = run(["upscale", "--model", str(model), str(path), "--out", str(tmp_path / "o"),
                              "--steps", "1", "--guidance", "1"], capsys)  # fmt: skip
    assert code == 0, err
    assert f"({mode}, " in err  # the conversion is reported
    with Image.open(written[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


def test_large_inputs_are_tiled(model, tmp_path, capsys):
    path = _image(tmp_path / "wide.png", size=(20, 12))
    code, written, err = run(["upscale", "--model", str(model), str(path), "--out", str(tmp_path / "o"),
                              "--tile", "8", "--tile-overlap", "4", *FAST], capsys)  # fmt: skip
    assert code == 0, err
    with Image.open(written[0]) as im:
        assert im.size == (80, 48)
        assert json.loads(im.info[METADATA_KEY])["tile"] == 8


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--noise-level", "351"], "--noise-level must be in [0, 350]"),
        (["--noise-level", "-5"], "--noise-level must be an integer in [0,"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000]"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--seed", "x"], "--seed must be an integer"),
        (["--scale", "2"], "--scale 2: this model upscales by 4 only"),
        (["--tile", "6"], "--tile must be a multiple of 4"),
        (["--tile", "0", "--tile-overlap", "4"], "--tile-overlap needs tiling"),
        (["--tile", "8", "--tile-overlap", "8"], "--tile-overlap must be an integer in [0, 7]"),
        (["--eta", "0.5", "--sampler", "euler"], "--eta applies to the ddim sampler only"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(model, tmp_path, capsys, extra, expected):
    path = _image(tmp_path / "in.png")
    code, written, err = run(["upscale", "--model", str(model), str(path), "--out", str(tmp_path / "o"), "--quiet",
                              *extra], capsys)  # fmt: skip
    assert code == 2 and not written
    assert err.startswith("diffusekit upscale: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # the folder made for the run is removed again


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs and the output folder were checked")


def test_hostile_paths_fail_before_the_model_loads(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(upscale_cli, "load_model", _refuse_to_load)
    good = _image(tmp_path / "good.png")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    weird = tmp_path / "new\nline -x.png"
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "nowhere.png")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    cases = [
        ([str(good), "--out", str(blocker)], f"--out {blocker}: is a file, not a folder"),
        ([str(good), "--out", str(blocker / "sub")], f"is inside {blocker}, which is a file"),
        ([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")], "missing.png: no such file or folder"),
        ([str(empty), "--out", str(tmp_path / "o")], "the folder holds no image files"),
        ([str(fake), "--out", str(tmp_path / "o")], "fake.png: not a readable image"),
        ([str(weird), "--out", str(tmp_path / "o")], "no such file or folder"),
        ([str(link), "--out", str(tmp_path / "o")], "a broken link or a special file"),
        ([str(fifo), "--out", str(tmp_path / "o")], "a broken link or a special file"),
        (["--out", str(tmp_path / "o")], "no INPUT given"),
        ([str(good)], "--out DIR is required"),
    ]
    for args, expected in cases:
        code, written, err = run(["upscale", "--model", str(model), *args], capsys)
        assert code == 2 and not written, err
        assert expected in " ".join(err.split()), (args, err)
    assert blocker.read_text() == "not a folder"
    assert not (tmp_path / "o").exists()


def test_an_input_with_an_awkward_name_is_upscaled(model, tmp_path, capsys):
    path = _image(tmp_path / "-x new\nline \u00fc.png")
    code, written, err = run(["upscale", "--model", str(model), "--out", str(tmp_path / "o"), *FAST, "--", str(path)],
                             capsys)  # fmt: skip
    assert code == 0, err
    with Image.open(written[0]) as im:
        assert json.loads(im.info[METADATA_KEY])["image"] == str(path)


def test_large_input_without_tiles_is_refused_before_the_model_loads(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(upscale_cli, "load_model", _refuse_to_load)
    big = tmp_path / "big.png"
    Image.new("RGB", (600, 500)).save(big)
    code, _, err = run(["upscale", "--model", str(model), str(big), "--tile", "0", "--out", str(tmp_path / "o")],
                       capsys)  # fmt: skip
    assert code == 2 and "too large to upscale in one piece" in err and "--tile" in err


def test_a_text_to_image_model_is_refused(fixtures_dir, tmp_path, capsys):
    path = _image(tmp_path / "in.png")
    code, _, err = run(["upscale", "--model", str(fixtures_dir / "pipelines" / "stable_diffusion"), str(path),
                        "--out", str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and "is not an x4 upscaler" in err and "diffusekit img2img" in err


def test_txt2img_with_the_upscaler_points_to_upscale(model, tmp_path, capsys):
    code, _, err = run(["txt2img", "--model", str(model), "a cat", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is the x4 upscaler" in err and "diffusekit upscale --model" in err


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as e:
        main(["upscale", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("examples:", "hires fix", "--model", "--prompt", "--negative", "--noise-level", "--steps",
                   "--guidance", "--seed", "--sampler", "--tile", "--tile-overlap", "--scale", "--out", "--quiet",
                   "default 20", "never overwritten", "alpha"):  # fmt: skip
        assert needle in text, needle


def _rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    from PIL import PngImagePlugin

    with Image.open(src) as im:
        meta = {**json.loads(im.info[METADATA_KEY]), **changes}
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, json.dumps(meta))
        im.save(dst, pnginfo=info)
    return dst


def test_replay_reproduces_and_overrides(model, tmp_path, capsys):
    path = _image(tmp_path / "in.png", size=(12, 8))
    out = tmp_path / "out"
    code, (first,), err = run(["upscale", "--model", str(model), str(path), "--out", str(out), "--steps", "2",
                               "--noise-level", "30", "--seed", "9", "--tile", "8", "--tile-overlap", "4",
                               "--prompt", "a cat", "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    code, (again,), err = run(["upscale", "--replay", str(first)], capsys)
    assert code == 0, err
    assert again.parent == out and again != first
    assert "replay: identical to" in err
    with Image.open(first) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        meta = json.loads(b.info[METADATA_KEY])
    assert (meta["seed"], meta["noise_level"], meta["tile"], meta["tile_overlap"]) == (9, 30, 8, 4)

    code, (other,), err = run(["upscale", "--replay", str(first), "--noise-level", "60", "--out",
                               str(tmp_path / "o2")], capsys)  # fmt: skip
    assert code == 0, err
    assert "replay:" not in err  # another setting: nothing to compare with
    with Image.open(other) as im:
        meta = json.loads(im.info[METADATA_KEY])
    assert (meta["noise_level"], meta["steps"], meta["prompt"]) == (60, 2, "a cat")


def test_replay_refuses_other_pngs_naming_the_field(model, fixtures_dir, tmp_path, capsys):
    path = _image(tmp_path / "in.png")
    code, (first,), err = run(["upscale", "--model", str(model), str(path), "--out", str(tmp_path / "out"),
                               *FAST], capsys)  # fmt: skip
    assert code == 0, err
    cases = [
        (_rewrite_metadata(first, tmp_path / "m.png", mode="txt2img"), "was made by 'diffusekit txt2img'"),
        (_rewrite_metadata(first, tmp_path / "s.png", steps="x"), "field 'steps' must be an integer"),
        (_rewrite_metadata(first, tmp_path / "d.png", dtype="float64"), "field 'dtype' must be one of"),
        (_rewrite_metadata(first, tmp_path / "n.png", noise_level=999), "field 'noise_level' must be in [0, 350]"),
        (path, "has no 'diffusekit' metadata"),
    ]
    for png, expected in cases:
        code, written, err = run(["upscale", "--replay", str(png), "--out", str(tmp_path / "r"), "--quiet"], capsys)
        assert code == 2 and not written and expected in err, (png, err)


def test_hostile_option_values_are_accepted_or_refused_by_name():
    """Extreme numbers for every numeric option: each is taken or refused with a ConfigError naming it, before
    any file or model is touched (settings_from_args runs first)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from diffusekit.cli.main import build_parser
    from diffusekit.errors import ConfigError

    ints = st.one_of(st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30]), st.integers())
    floats = st.floats(allow_nan=True, allow_infinity=True)
    options = ("--noise-level", "--steps", "--seed", "--tile", "--tile-overlap", "--scale")

    @settings(max_examples=150, deadline=None)
    @given(values=st.tuples(*[ints] * len(options)), guidance=floats, eta=floats)
    def check(values, guidance, eta):
        argv = ["upscale", "x.png", "--model", "m", "--out", "o", f"--guidance={guidance}", f"--eta={eta}"]
        argv += [f"{option}={value}" for option, value in zip(options, values)]
        args = build_parser().parse_args(argv)
        try:
            upscale_cli.settings_from_args(args, 1)
        except ConfigError as e:
            assert any(option in str(e) for option in (*options, "--guidance", "--eta")), str(e)

    check()
