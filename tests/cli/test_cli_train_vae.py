"""``diffusekit train-vae``: a short run end to end, its exported folder, bad input, the manual."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusekit.cli.main import main
from diffusekit.io.models import load_vae
from diffusekit.pipelines.common import LatentCodec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--preset", "test-tiny", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0", "--no-progress",
        "--no-tensorboard", "--device", "cpu", "--scaling-examples", "32"]  # fmt: skip


@pytest.fixture
def blobs(tmp_path):
    """A .npz of 32 8x8 grayscale images: a bright square on a dark background."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, (32, 8, 8), dtype=np.uint8)
    for img in images:
        y, x = rng.integers(0, 5, 2)
        img[y : y + 3, x : x + 3] = 230
    np.savez(tmp_path / "blobs.npz", images=images)
    return str(tmp_path / "blobs.npz")


def test_a_short_run_writes_a_vae_folder_that_loads_with_its_scaling_factor(tmp_path, blobs, capsys):
    out = tmp_path / "run"
    code = main(["train-vae", blobs, "--output-dir", str(out), "--steps", "6", "--sample-every-steps", "3", *TINY,
                 "--scaling-examples", "16"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "VAE folder:" in printed and "scaling_factor" in printed
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert config["block_out_channels"] == [8, 16, 16] and config["in_channels"] == 1
    vae = load_vae(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(config["scaling_factor"]) and vae.config.scaling_factor != 1.0
    # the pipelines' latent codec (the one place the factor is applied) gives unit-variance latents on all 32
    # images, the factor having been measured on 16 of them
    x = torch.from_numpy(np.load(blobs)["images"]).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        z = LatentCodec(vae).encode(x, generator=torch.Generator().manual_seed(3))
    assert z.shape == (32, 4, 2, 2)
    assert float(z.std()) == pytest.approx(1.0, abs=0.15)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    # a second run into the same folder must not silently start over
    assert main(["train-vae", blobs, "--output-dir", str(out), "--steps", "8", *TINY]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_a_resolution_not_a_multiple_of_the_factor_names_the_option(tmp_path, blobs, capsys):
    code = main(["train-vae", blobs, "--resolution-px", "10", "--output-dir", str(tmp_path / "r"), *TINY])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusekit train-vae: error: ") and "\n" not in err
    assert "--resolution-px to a multiple of 4 (e.g. 12)" in err and "--downsample-factor" in err
    assert main(["train-vae", blobs, "--downsample-factor", "3", "--output-dir", str(tmp_path / "r"), *TINY]) == 2
    assert "--downsample-factor must be a power of two" in capsys.readouterr().err


def test_bad_input_is_refused_naming_the_option(tmp_path, blobs, capsys):
    assert main(["train-vae", "--output-dir", str(tmp_path / "r")]) == 2
    assert "DATA is required" in capsys.readouterr().err
    assert main(["train-vae", blobs, "--kl-weight", "-1", "--output-dir", str(tmp_path / "r")]) == 2
    assert "--kl-weight must be a finite number in [0.0, 1000.0]" in capsys.readouterr().err
    code = main(["train-vae", blobs, "--adversarial", "--discriminator-layers", "2", "--output-dir",
                 str(tmp_path / "r"), *TINY])  # fmt: skip
    assert code == 2
    assert "--discriminator-layers=2 needs images of at least 12px, the data has 8px" in capsys.readouterr().err
    code = main(["train-vae", blobs, "--preset", "kl-f8", "--resolution-px", "1024", "--limit", "2", "--batch-size",
                 "100000", "--output-dir", str(tmp_path / "r"), "--device", "cpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--batch-size=100000 at --resolution-px=1024 needs about" in err and "use a smaller --batch-size" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(SystemExit):
        main(["train-vae", blobs, "--reconstruction-loss", "lpips"])
    assert "invalid choice: 'lpips'" in capsys.readouterr().err


def test_help_reads_like_a_manual(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-vae", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "Rombach et al. 2022",
        "scaling_factor is 1 / the standard deviation of posterior samples",
        "LPIPS",
        "--kl-weight W weight of the KL divergence",
        "(default: 1e-06)",
        "(default: l1)",
        "--adversarial add the PatchGAN hinge loss",
        "examples: diffusekit train-vae fashion-mnist",
        "--resume",
    ):
        assert phrase in text, phrase
    assert main(["train-vae", "bundled", "--print-config", "--kl-weight", "1e-5"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["kl_weight"] == 1e-5
