"""Random crops of large training images in the super-resolution task (``task.crop_px``): the windows, their
draws (seeded per micro-batch, sliced per rank, drawn after the task's other draws), the network's training
size, exact resume of a cropped run, and the option's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_checks import assert_resumed_run_equals, sr_config  # tests/training

from diffusekit.errors import ConfigError
from diffusekit.training.config import TaskConfig, TrainConfig
from diffusekit.training.data import ArrayDataset
from diffusekit.training.super_resolution import SRDraws, SuperResolution, crop_windows
from diffusekit.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _position_images(n: int, size: int) -> torch.Tensor:
    """(n, 1, size, size) images whose pixel (i, j) of image k holds k * size^2 + i * size + j."""
    return torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)


def test_crop_windows_are_the_slices_at_the_corners():
    images = torch.randn(3, 2, 10, 12)
    corners = torch.tensor([[0, 0], [3, 5], [6, 8]])  # the last window touches the bottom-right corner
    out = crop_windows(images, corners, 4)
    assert out.shape == (3, 2, 4, 4)
    for k, (top, left) in enumerate(corners.tolist()):
        assert torch.equal(out[k], images[k, :, top : top + 4, left : left + 4])


def test_crop_corners_cover_the_room_and_leave_the_other_draws_as_they_were():
    task = TaskConfig(kind="super-resolution", scale=2, max_noise_level=5)
    plain = SRDraws.draw(3, 7, 2000, (1, 8, 8), task)
    cropped = SRDraws.draw(3, 7, 2000, (1, 8, 8), task, room=4)
    # drawn last: a run without crops (or resumed from before crops existed) draws exactly as before
    for name in ("degrade_noise", "levels", "cond_noise"):
        assert torch.equal(getattr(plain, name), getattr(cropped, name)), name
    assert torch.equal(plain.corners, torch.zeros(2000, 2, dtype=torch.long))
    counts = torch.bincount(cropped.corners.flatten(), minlength=5)
    assert len(counts) == 5 and int(counts.min()) > 4000 / 5 * 0.8  # 0..4 on both axes, about uniform
    assert not torch.equal(cropped.corners[:, 0], cropped.corners[:, 1])  # rows and columns drawn apart
    other = SRDraws.draw(3, 8, 2000, (1, 8, 8), task, room=4)
    assert not torch.equal(other.corners, cropped.corners)  # a new window every micro-batch


def test_condition_crops_each_example_at_its_drawn_corner_and_ranks_slice_the_global_batch():
    config = TrainConfig().replace(task={"kind": "super-resolution", "scale": 2, "crop_px": 6})
    sr = SuperResolution.for_run(config, 16)
    assert (sr.size, sr.resolution) == (6, 16)
    x0 = _position_images(8, 16)
    crops, cond, labels = sr.condition(x0, micro=5, start=0, global_batch=8)
    assert crops.shape == cond.shape == (8, 1, 6, 6) and labels is None
    corners = SRDraws.draw(0, 5, 8, (1, 6, 6), sr.task, room=10).corners
    for k, (top, left) in enumerate(corners.tolist()):
        assert float(crops[k, 0, 0, 0]) == k * 256 + top * 16 + left
        assert torch.equal(crops[k, 0], x0[k, 0, top : top + 6, left : left + 6])
    assert len({tuple(c) for c in corners.tolist()}) > 1  # not one window for the whole batch
    # rank 1 of 2 gets the second half of the same draws
    half, cond_half, _ = sr.condition(x0[4:], micro=5, start=4, global_batch=8)
    assert torch.equal(half, crops[4:]) and torch.equal(cond_half, cond[4:])


def test_cropped_training_trains_at_the_crop_size_and_resumes_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16), dtype=np.uint8)
    task = {"scale": 2, "crop_px": 8, "max_noise_level": 10}
    full = Trainer(sr_config(tmp_path / "a", task), dataset=ArrayDataset(images))
    assert full.unet_config.sample_size == 8 and full.train_size == 8 and full.dataset.resolution == 16
    full.fit()
    index = json.loads((tmp_path / "a" / "run" / "model" / "unet" / "config.json").read_text())
    assert index["sample_size"] == 8  # the exported model's training size: upscale tiles larger inputs
    first = Trainer(sr_config(tmp_path / "b", task, max_steps=2), dataset=ArrayDataset(images))
    first.fit()
    resumed = Trainer(sr_config(tmp_path / "b", task), dataset=ArrayDataset(images), resume="latest")
    assert resumed.step == 2 and resumed.train_size == 8
    resumed.fit()
    assert_resumed_run_equals(full, resumed, tmp_path / "a" / "run", tmp_path / "b" / "run")


def test_the_preview_shows_the_centre_windows(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    config = sr_config(tmp_path, {"scale": 2, "crop_px": 8}, sample_steps=1)
    trainer = Trainer(config, dataset=ArrayDataset(images))
    strip = trainer.sr.preview(trainer, 2)  # (4 columns x 2 rows, C, 8, 8)
    assert strip.shape == (8, 1, 8, 8)
    truth = torch.from_numpy(images[:2, 4:12, 4:12]).float() / 255
    torch.testing.assert_close(strip[3::4, 0], truth)


def test_crop_option_is_checked(tmp_path, capsys):
    images = np.zeros((4, 16, 16), dtype=np.uint8)
    with pytest.raises(ConfigError, match="task.crop_px 24 is larger than the data's 16px images"):
        Trainer(sr_config(tmp_path, {"scale": 2, "crop_px": 24}), dataset=ArrayDataset(images))
    with pytest.raises(ConfigError, match="task.crop_px 10 is not a multiple of task.scale 4; set task.crop_px"):
        Trainer(sr_config(tmp_path, {"scale": 4, "crop_px": 10}), dataset=ArrayDataset(images))
    with pytest.raises(ConfigError, match="task.crop_px applies to task.kind 'super-resolution' only"):
        TrainConfig().replace(task={"crop_px": 8})
    with pytest.raises(ConfigError, match="task.crop_px"):
        TrainConfig().replace(task={"kind": "super-resolution", "crop_px": -1})
    # a data size that is no multiple of the scale is fine when the crop is one
    trainer = Trainer(sr_config(tmp_path, {"scale": 4, "crop_px": 12}), dataset=ArrayDataset(np.zeros((4, 14, 14))))
    assert trainer.unet_config.sample_size == 12

    from diffusekit.cli.main import main

    assert main(["train", "--task", "super-resolution", "--crop-px", "64", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["task"]["crop_px"] == 64
