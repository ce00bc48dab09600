"""Exact resume: N steps in one go == k steps, SIGKILL, resume to N -- bit for bit on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_checks import assert_same_checkpoint, kill_and_resume, runner_script  # tests/training

from diffusekit.training.monitor import read_metrics


def _image_folder(root):
    """A folder of 8x8 grayscale images in 3 class sub-folders (read by DataLoader workers)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 60, (8, 8), dtype=np.uint8)
            img[2 * c + 1] = 255
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    _image_folder(tmp_path / "data")
    (tmp_path / "cfg.toml").write_text(
        "[model]\npreset = 'test-tiny'\noverrides = { dropout = 0.1 }\n"  # dropout: the torch RNG must resume too
        "[diffusion]\nmin_snr_gamma = 5.0\noffset_noise = 0.1\nlabel_dropout = 0.3\n"
        "[optim]\nbatch_size = 5\nwarmup_steps = 3\nlr = 1e-3\n"
    )
    common = ["train", "--config", str(tmp_path / "cfg.toml"), "--data", str(tmp_path / "data"), "--random-flip",
              "--num-workers", "1", "--steps", "8", "--checkpoint-every-steps", "2", "--keep-checkpoints", "10",
              "--log-every-steps", "1", "--no-progress", "--no-tensorboard", "--device", "cpu"]  # fmt: skip

    def step_5_is_lost_work(cut):
        assert [r["step"] for r in read_metrics(cut / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    runner = runner_script("train", "trainer.Trainer")
    full, cut = kill_and_resume(tmp_path, common, runner, kill_after=5, checkpoints=["step-00000002", "step-00000004"],
                                before_resume=step_5_is_lost_work)  # fmt: skip
    a, b = full / "checkpoints" / "step-00000008", cut / "checkpoints" / "step-00000008"
    assert_same_checkpoint(a, b)
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["data_position"] == sb["data_position"] == 8 * 5
    assert sa["optimizer"] == sb["optimizer"]
    # the metrics of the resumed run are those of the uninterrupted one (step 5's record was rewritten)
    ma = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(full / "metrics.jsonl")]
    mb = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(cut / "metrics.jsonl")]
    assert ma == mb and len(ma) == 8


@pytest.mark.parametrize("damage", ["truncate", "no-manifest"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, damage):
    """A run killed while writing (or a corrupted disk) leaves a bad newest checkpoint: resume uses the one before."""
    from diffusekit.cli.main import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    args = ["train", "--data", str(tmp_path / "d.npz"), "--preset", "test-tiny", "--batch-size", "4",
            "--output-dir", str(tmp_path / "run"), "--checkpoint-every-steps", "1", "--keep-checkpoints", "3",
            "--no-progress", "--no-tensorboard"]  # fmt: skip
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--steps", "2"]) == 0
        newest = tmp_path / "run" / "checkpoints" / "step-00000002"
        if damage == "truncate":
            f = newest / "optimizer.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        else:
            (newest / "manifest.json").unlink()
        with pytest.warns(UserWarning, match="skipping checkpoint.*step-00000002"):
            assert main([*args, "--steps", "3", "--resume"]) == 0
    finally:
        torch.set_num_threads(n)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 12
