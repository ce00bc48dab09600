"""``diffusekit txt2img | img2img | inpaint --guidance-interval LO,HI`` (Kynkäänniemi et al. 2024: guidance only at
noise levels LO < sigma <= HI) on the tiny reference pipeline: one-line errors naming the option, the interval in
the PNG, and --replay reproducing it bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cli_running import run
from PIL import Image

from diffusekit.cli.common import parse_guidance_interval
from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.pipelines.recipe import PARAMETERS_KEY, read_png_metadata

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _txt2img(sd_folder: Path, out: Path, *extra: str) -> list[str]:
    return ["txt2img", "--model", str(sd_folder), "a red fox", "--steps", "2", "--size", "16", "--seed", "3",
            "--sampler", "euler", "--dtype", "float32", "--out", str(out), "--quiet", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5,1", "--guidance-interval must satisfy 0 <= LO < HI (noise levels sigma), got 5,1"),
        ("1,1", "--guidance-interval must satisfy 0 <= LO < HI"),
        ("-1,2", "--guidance-interval must satisfy 0 <= LO < HI"),
        ("nan,2", "--guidance-interval must satisfy 0 <= LO < HI"),
        ("inf,inf", "--guidance-interval must satisfy 0 <= LO < HI"),
        ("12", "--guidance-interval must be two noise levels LO,HI (sigma, e.g. 0.28,5.42; HI may be inf), got '12'"),
        ("a,b", "--guidance-interval must be two noise levels LO,HI"),
        ("1,2,3", "--guidance-interval must be two noise levels LO,HI"),
        ("", "--guidance-interval must be two noise levels LO,HI"),
    ],
)
def test_a_bad_interval_is_a_one_line_error_naming_the_option(sd_folder, tmp_path, capsys, value, expected):
    code, written, err = run(_txt2img(sd_folder, tmp_path / "out", "--guidance-interval", value), capsys)
    assert code == 2 and not written, err
    assert expected in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_interval_without_guidance_is_refused(sd_folder, tmp_path, capsys):
    code, written, err = run(_txt2img(sd_folder, tmp_path, "--guidance", "1", "--guidance-interval", "0.3,5"), capsys)
    assert code == 2 and not written
    assert "--guidance-interval limits the guidance, but --guidance is 1 (none): give --guidance S" in err


def test_an_interval_under_lcm_guidance_1_is_noted(sd_folder, tmp_path, capsys):
    argv = ["txt2img", "--model", str(sd_folder), "a red fox", "--steps", "2", "--size", "16", "--sampler", "LCM",
            "--guidance-interval", "1,2", "--out", str(tmp_path)]  # fmt: skip
    code, written, err = run(argv, capsys)
    assert code == 0 and len(written) == 1, err
    assert "--guidance-interval has nothing to limit at guidance 1" in err


def test_the_parser_is_shared_with_sample():
    assert parse_guidance_interval("0.28,5.42") == (0.28, 5.42)
    assert parse_guidance_interval(" 0.5 , inf ") == (0.5, float("inf"))
    assert parse_guidance_interval(None) is None and parse_guidance_interval(None, 1.0) is None
    with pytest.raises(ConfigError, match="^--guidance-interval limits the guidance"):
        parse_guidance_interval("0.3,5", 1.0)


def test_the_interval_is_recorded_and_replays_bit_for_bit(sd_folder, tmp_path, capsys):
    code, made, err = run(_txt2img(sd_folder, tmp_path / "a", "--guidance-interval", "0.5,inf"), capsys)
    assert code == 0 and len(made) == 1, err
    meta = read_png_metadata(made[0])
    assert meta["guidance_interval"] == [0.5, None] and meta["format_version"] == 3
    with Image.open(made[0]) as im:
        assert 'Guidance interval: "(0.5, inf]"' in im.info[PARAMETERS_KEY]

    code, again, err = run(["txt2img", "--replay", str(made[0])], capsys)
    assert code == 0 and len(again) == 1, err
    assert "replay: identical" in err
    assert np.array_equal(pixels(again[0]), pixels(made[0]))
    assert read_png_metadata(again[0])["guidance_interval"] == [0.5, None]

    code, plain, err = run(_txt2img(sd_folder, tmp_path / "b"), capsys)  # every step: another image
    assert code == 0 and not np.array_equal(pixels(plain[0]), pixels(made[0]))
    assert read_png_metadata(plain[0])["guidance_interval"] is None
    # beside --replay the option replaces the recorded interval; 0,inf guides at every step, as no interval does
    code, cleared, err = run(["txt2img", "--replay", str(made[0]), "--guidance-interval", "0,inf",
                              "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert code == 0, err
    assert "replay:" not in err  # another recipe: nothing to compare
    assert np.array_equal(pixels(cleared[0]), pixels(plain[0]))
    code, _, err = run(["txt2img", "--replay", str(made[0]), "--guidance-interval", "3", "--out", str(tmp_path)],
                       capsys)  # fmt: skip
    assert code == 2 and "--guidance-interval must be two noise levels LO,HI" in err


def test_an_interval_above_every_noise_level_is_guidance_1(sd_folder, tmp_path, capsys):
    code, outside, err = run(_txt2img(sd_folder, tmp_path / "a", "--guidance-interval", "1e6,inf"), capsys)
    assert code == 0, err
    code, unguided, err = run(_txt2img(sd_folder, tmp_path / "b", "--guidance", "1"), capsys)
    assert code == 0, err
    assert np.array_equal(pixels(outside[0]), pixels(unguided[0]))


def test_img2img_and_inpaint_record_and_replay_the_interval(sd_folder, tmp_path, capsys):
    Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for mode, extra in (("img2img", []), ("inpaint", ["--mask", str(tmp_path / "mask.png")])):
        code, made, err = run([mode, "--model", str(sd_folder), "a cat", "--image", str(tmp_path / "in.png"), *extra,
                               "--strength", "1", "--steps", "2", "--guidance-interval", "0.28,5.42", "--out",
                               str(tmp_path / mode), "--quiet"], capsys)  # fmt: skip
        assert code == 0, err
        assert read_png_metadata(made[0])["guidance_interval"] == [0.28, 5.42]
        code, again, err = run([mode, "--replay", str(made[0])], capsys)
        assert code == 0 and "replay: identical" in err, err
        assert np.array_equal(pixels(again[0]), pixels(made[0]))


def test_help_reads_like_a_manual(capsys):
    for command in ("txt2img", "img2img", "inpaint"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--guidance-interval LO,HI" in text
        for needle in ("LO < sigma <= HI", "Kynkaanniemi et al. 2024", "Applying Guidance in a Limited Interval",
                       "0.28,5.42", "HI may be inf", "Default: every step"):  # fmt: skip
            assert needle in text, (command, needle)
        assert re.search(r"guidance and its interval", text)
