"""``diffusekit train --latent``: a captioned folder end to end into txt2img, class labels into sample, options
that belong to the other kind of run refused by name, resume without repeating --latent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--preset", "latent-tiny", "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "0", "--no-progress",
        "--no-tensorboard", "--device", "cpu"]  # fmt: skip


@pytest.fixture
def captioned(tmp_path):
    """Four 16x16 RGB images with captions; one caption file missing."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if i:
            (folder / f"{i}.txt").write_text(["a red square", "a blue circle"][i % 2])
    return folder


def test_captions_train_into_a_txt2img_folder(tmp_path, captioned, sd_folder, capsys):
    out = tmp_path / "run"
    argv = ["train", "--latent", str(sd_folder), "--data", str(captioned), "--output-dir", str(out), "--steps", "2"]
    code = main(argv + TINY)
    err = capsys.readouterr().err
    assert code == 2 and "0.png" in err and "--caption" in err  # a missing caption is named, with the option
    assert main(argv + TINY + ["--caption", "a green thing"]) == 0
    printed = capsys.readouterr().out
    assert "diffusekit txt2img --model" in printed
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    images = tmp_path / "images"
    code = main(["txt2img", "--model", str(out / "model"), "a red square", "--size", "16", "--steps", "2",
                 "--out", str(images), "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert [Image.open(p).size for p in images.glob("*.png")] == [(16, 16)]


def test_class_labels_train_into_a_sample_folder_and_resume(tmp_path, sd_folder, capsys):
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i + (0 if name == "a" else 120), np.uint8)).save(
                data / name / f"{i}.png"
            )
    out = tmp_path / "run"
    argv = ["train", "--latent", str(sd_folder), "--data", str(data), "--output-dir", str(out), *TINY]
    assert main(argv + ["--steps", "2", "--checkpoint-every-steps", "2"]) == 0
    assert "diffusekit sample" in capsys.readouterr().out
    grid, each = tmp_path / "grid.png", tmp_path / "each"
    assert main(["sample", str(out / "model"), "--n", "2", "--class", "1", "--steps", "2", "--out", str(grid),
                 "--out-dir", str(each)]) == 0  # fmt: skip
    assert [Image.open(p).size for p in each.glob("*.png")] == [(16, 16)] * 2  # decoded: 8x8 latents, f=2
    # --resume reads the kind of run from the checkpoint: no --latent needed
    assert main(["train", "--resume", "--output-dir", str(out), "--steps", "3", "--no-progress",
                 "--no-tensorboard"]) == 0  # fmt: skip
    assert "trained to step 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--caption", "x"], "--caption applies to latent runs only (add --latent VAE_FOLDER)"),
        (["--latent", "VAE", "--task", "super-resolution"], "--task applies to pixel-space runs only"),
        (["--latent", "VAE", "--posterior", "mode"], "invalid choice"),
    ],
)
def test_options_of_the_other_kind_of_run_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit) if "invalid" in message else _no_raise():
        code = main(["train", *extra, "--steps", "1"])
        assert code == 2
    assert message in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
