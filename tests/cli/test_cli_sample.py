"""``diffusekit sample`` against a hostile user: every bad option is a one-line error naming it (exit 2),
checked before the model loads or anything is generated; outputs are never replaced without --overwrite."""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli.main import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny class-conditional pixel model (8x8 greyscale, 11 class ids) in the inference-folder layout."""
    from diffusekit.networks.unet import UNet, UNetConfig
    from diffusekit.pipelines.unconditional import UnconditionalPipeline, save_pipeline
    from diffusekit.samplers.config import SamplerConfig

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=1, out_channels=1, channels=(8, 8), layers_per_block=1,
                     attention_levels=(False, False), mid_attention=False, num_heads=(1, 1), num_classes=11,
                     norm_groups=4, sample_size=8)  # fmt: skip
    folder = tmp_path_factory.mktemp("model") / "cc"
    save_pipeline(UnconditionalPipeline(UNet(cfg), SamplerConfig()), folder)
    return folder


def cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def sample(model: Path, *extra: str) -> list[str]:
    return ["sample", str(model), "--n", "2", "--steps", "1", "--device", "cpu", *extra]


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith("diffusekit sample: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--seed", str(2**64)], ["--seed", "[0, 9223372036854775807]"]),
        (["--seed", "-1"], ["--seed"]),
        (["--seed", str(2**63 - 1)], ["--seed", "exceeds the largest seed"]),
        (["--class", "99999999999999999999"], ["--class", "[0, 1048575]"]),
        (["--class", "11"], ["--class", "[0, 10]"]),
        (["--class", "1", "2", "3"], ["--class", "one id or --n=2 ids"]),
        (["--guidance", "inf", "--class", "1"], ["--guidance", "finite", "1000"]),
        (["--guidance", "nan"], ["--guidance"]),
        (["--eta", "nan"], ["--eta", "[0.0, 1.0]"]),
        (["--guidance", "2", "--guidance-interval", "5,1"], ["--guidance-interval", "0 <= LO < HI"]),
        (["--guidance", "2", "--guidance-interval", "1"], ["--guidance-interval", "LO,HI"]),
        (["--guidance", "2", "--guidance-interval", "12"], ["--guidance-interval", "LO,HI"]),  # not 1,2
        (["--guidance", "2", "--guidance-interval", "a,b"], ["--guidance-interval", "LO,HI"]),
        (["--guidance-interval", "0.3,5"], ["--guidance-interval", "--guidance is 1"]),
        (["--guide-model", "x"], ["--guide-model", "--guidance, which is 1"]),
        (["--guidance", "2", "--guide-labels", "none"], ["--guide-labels none", "give --guide-model"]),
        (["--guidance", "2", "--guide-model", "missing"], ["--guide-model: model not found: missing"]),
        (["--steps", "0"], ["--steps", "[1, 1000]"]),
        (["--nrow", "0"], ["--nrow"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--scale", "100000"], ["--scale", "[1, 64]"]),
        (["--scale", "64", "--n", "200"], ["--scale", "more than the 67108864 pixels"]),
        (["--sampler", "nope"], ["--sampler", "ddim"]),
        (["--out", "grid.gif"], ["--out", ".png, .jpg, .jpeg"]),
    ],
)
def test_bad_options_are_one_line_errors_before_anything_is_written(model, tmp_path, monkeypatch, capsys, extra,
                                                                    needles):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, err = cli(sample(model, *extra), capsys)
    one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_out_naming_a_folder_or_an_existing_file_is_refused(model, tmp_path, capsys):
    code, err = cli(sample(model, "--out", str(tmp_path)), capsys)
    one_line_error(code, err, "--out", "is a folder")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the user's own file")
    code, err = cli(sample(model, "--out", str(grid)), capsys)
    one_line_error(code, err, "--out", "exists", "--overwrite")
    assert grid.read_bytes() == b"the user's own file"
    link = tmp_path / "link.png"
    link.symlink_to(grid)
    code, err = cli(sample(model, "--out", str(link)), capsys)
    one_line_error(code, err, "--out", "exists")
    assert link.is_symlink() and grid.read_bytes() == b"the user's own file"
    code, err = cli(sample(model, "--out", str(grid), "--overwrite"), capsys)
    assert code == 0, err
    with Image.open(grid) as im:
        assert im.format == "PNG" and json.loads(im.info["diffusekit"])["steps"] == 1


def test_out_dir_naming_a_file_is_refused_and_numbered_files_are_never_replaced(model, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, err = cli(sample(model, "--out", str(tmp_path / "g.png"), "--out-dir", str(a_file)), capsys)
    one_line_error(code, err, "--out-dir", "not a folder")
    assert not (tmp_path / "g.png").exists() and a_file.read_text() == "mine"
    out_dir = tmp_path / "singles"
    for i in range(2):
        code, err = cli(sample(model, "--out", str(tmp_path / f"g{i}.png"), "--out-dir", str(out_dir)), capsys)
        assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["00000-0.png", "00001-1.png", "00002-0.png", "00003-1.png"]
    with Image.open(out_dir / "00003-1.png") as im:
        meta = json.loads(im.info["diffusekit"])
    assert meta["seed"] == 1


def test_out_x_jpg_is_a_jpeg(model, tmp_path, capsys):
    code, err = cli(sample(model, "--out", str(tmp_path / "x.jpg"), "--class", "3"), capsys)
    assert code == 0, err
    with Image.open(tmp_path / "x.jpg") as im:
        assert im.format == "JPEG"
        settings = json.loads(json.loads(im.info["comment"])["diffusekit"])
    assert settings["class_labels"] == [3, 3]


def test_the_guidance_interval_is_recorded_in_the_png(model, tmp_path, capsys):
    out = tmp_path / "g.png"
    code, err = cli(sample(model, "--out", str(out), "--class", "3", "--guidance", "2", "--guidance-interval",
                           "0.5,inf"), capsys)  # fmt: skip
    assert code == 0, err
    with Image.open(out) as im:
        settings = json.loads(im.text["diffusekit"])
    assert settings["guidance_interval"] == [0.5, None] and settings["guidance_scale"] == 2.0


def test_autoguidance_with_a_guide_model_and_a_guide_of_another_model(model, tmp_path, capsys):
    from diffusekit.networks.unet import UNet, UNetConfig
    from diffusekit.pipelines.unconditional import UnconditionalPipeline, save_pipeline
    from diffusekit.samplers.config import SamplerConfig

    out = tmp_path / "a.png"
    code, err = cli(sample(model, "--out", str(out), "--guidance", "2", "--guide-model", str(model)), capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert json.loads(im.text["diffusekit"])["guide_model"] == str(model)
        assert json.loads(im.text["diffusekit"])["guide_labels"] == "class"
    # a guide equal to the model changes nothing only while it sees the same class: without it, it is CFG-like
    code, err = cli(sample(model, "--out", str(tmp_path / "n.png"), "--guidance", "2", "--guide-model", str(model),
                           "--guide-labels", "none", "--class", "3"), capsys)  # fmt: skip
    assert code == 0, err
    code, err = cli(sample(model, "--out", str(tmp_path / "cfg.png"), "--guidance", "2", "--class", "3"), capsys)
    assert code == 0, err
    with Image.open(tmp_path / "n.png") as a, Image.open(tmp_path / "cfg.png") as b:
        assert json.loads(a.text["diffusekit"])["guide_labels"] == "none"
        pa, pb = (np.asarray(im, dtype=np.int16) for im in (a, b))
    # the model guided by itself without a class is classifier-free guidance (one doubled batch there, two
    # batches here: equal up to rounding)
    assert np.abs(pa - pb).max() <= 1 and pa.std() > 0
    other = tmp_path / "other"
    cfg = UNetConfig(in_channels=1, out_channels=1, channels=(8, 8), layers_per_block=1,
                     attention_levels=(False, False), mid_attention=False, num_heads=(1, 1), num_classes=5,
                     norm_groups=4, sample_size=8)  # fmt: skip
    save_pipeline(UnconditionalPipeline(UNet(cfg), SamplerConfig()), other)
    code, err = cli(sample(model, "--out", str(tmp_path / "b.png"), "--guidance", "2", "--guide-model", str(other)),
                    capsys)  # fmt: skip
    one_line_error(code, err, "--guide-model", "num_classes is 5, the model's is 11")
    assert not (tmp_path / "b.png").exists()
    same_shapes = UNet(dataclasses.replace(cfg, num_classes=11))
    save_pipeline(UnconditionalPipeline(same_shapes, SamplerConfig(preconditioning="edm", sampler="heun")),
                  tmp_path / "edm")  # fmt: skip
    code, err = cli(sample(model, "--out", str(tmp_path / "c.png"), "--guidance", "2", "--guide-model",
                           str(tmp_path / "edm")), capsys)  # fmt: skip
    one_line_error(code, err, "--guide-model", "preconditioning is 'edm', the model's is 'none'")


def test_a_read_only_output_folder_is_found_before_sampling(model, tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    sampled = []
    monkeypatch.setattr("diffusekit.pipelines.unconditional.UnconditionalPipeline.__call__",
                        lambda *a, **k: sampled.append(1))  # fmt: skip
    code, err = cli(sample(model, "--out", str(tmp_path / "g.png")), capsys)
    one_line_error(code, err, "--out", "Read-only file system")
    assert sampled == []


def test_a_write_that_fails_late_is_one_line_naming_out(model, tmp_path, monkeypatch, capsys):
    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, err = cli(sample(model, "--out", str(tmp_path / "g.png")), capsys)
    one_line_error(code, err, "--out", "g.png: could not write the image (Read-only file system)")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("scale in [0, 1000] (default 1", "1-4096 (default 64)", "(default samples.png)",
                   "(default 0)", "(default 50)"):  # fmt: skip
        assert needle in text, needle
