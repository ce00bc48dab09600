"""The super-resolution task of the trainer: the degradation pipeline, the condition's noise levels, the task
switch on the bundled digits (7 -> 28 px), the export that ``diffusekit upscale`` reads, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_checks import assert_resumed_run_equals, sr_config  # tests/training

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.pipelines.loading import identify
from diffusekit.pipelines.super_resolution import downsample, load_sr_pipeline
from diffusekit.training.config import TaskConfig, TrainConfig
from diffusekit.training.data import ArrayDataset
from diffusekit.training.export import load_for_sampling
from diffusekit.training.monitor import read_metrics
from diffusekit.training.super_resolution import SRDraws, SuperResolution, degrade, gaussian_blur
from diffusekit.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n: int = 16, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 3, n)


# ----------------------------------------------------------------------------------------------- degradation
def test_area_downsample_is_the_mean_of_each_block():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # 2x2 blocks: (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+11+14+15)/4
    assert torch.equal(downsample(x, 2, "area"), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(downsample(x, 4, "area"), torch.tensor([[[[7.5]]]]))


def test_bicubic_downsample_keeps_constants_and_shapes():
    x = torch.full((2, 3, 12, 8), 0.3)
    y = downsample(x, 4, "bicubic")
    assert y.shape == (2, 3, 3, 2)
    torch.testing.assert_close(y, torch.full_like(y, 0.3))
    with pytest.raises(ConfigError, match="cannot be made 4 times smaller"):
        downsample(torch.zeros(1, 1, 10, 8), 4)


def test_gaussian_blur_keeps_constants_and_spreads_a_point_as_a_gaussian():
    const = torch.full((1, 1, 9, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 1.0), const)
    point = torch.zeros(1, 1, 15, 15)
    point[0, 0, 7, 7] = 1
    out = gaussian_blur(point, 1.0)[0, 0].double()
    r = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(r**2) / 2)
    g = g / g.sum()
    torch.testing.assert_close(out[4:11, 4:11], g[:, None] * g[None, :])  # the separable 2-D Gaussian
    assert torch.equal(gaussian_blur(point, 0.0), point)


def test_degrade_adds_noise_of_the_configured_level():
    x0 = torch.zeros(64, 1, 16, 16)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = degrade(x0, TaskConfig(kind="super-resolution", scale=4, noise_std=0.2), noise)
    assert y.shape == (64, 1, 4, 4)
    assert abs(float(y.std()) - 0.2) < 0.01  # 1024 draws
    assert torch.equal(degrade(x0, TaskConfig(kind="super-resolution", scale=4), noise), torch.zeros_like(y))


def test_condition_noise_levels_follow_the_schedule():
    """Zero images: the condition is sqrt(1 - abar) n at level k >= 1 (abar of timestep k - 1 of the linear
    DDPM schedule, computed here from its betas) and exactly zero at level 0; levels cover 0..max."""
    config = TrainConfig().replace(task={"kind": "super-resolution", "scale": 2, "max_noise_level": 3})
    sr = SuperResolution.for_run(config, 16)
    _, cond, levels = sr.condition(torch.zeros(400, 1, 16, 16), micro=0, start=0, global_batch=400)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for k in range(4):
        sel = cond[levels == k]
        if k == 0:
            assert torch.equal(sel, torch.zeros_like(sel))
        else:
            assert float(sel.std()) == pytest.approx(np.sqrt(1 - abar[k - 1]), rel=0.03)
    # the draws of a global batch sliced per rank are those of the whole batch
    whole = SRDraws.draw(0, 5, 8, (1, 16, 16), sr.task)
    part = SRDraws.draw(0, 5, 8, (1, 16, 16), sr.task).slice(4, 8)
    assert torch.equal(whole.cond_noise[4:], part.cond_noise) and torch.equal(whole.levels[4:], part.levels)


# ----------------------------------------------------------------------------------------------- the task
def test_task_switch_trains_on_bundled_digits_and_the_export_upscales(tmp_path):
    config = sr_config(tmp_path, {"scale": 4, "max_noise_level": 50}, max_steps=40, checkpoint_every=100,
                       log_every=10, sample_every=40, num_sample_images=2, sample_steps=2).replace(
        data={"source": "bundled", "limit": 128}, optim={"lr": 3e-3, "batch_size": 16, "warmup_steps": 5})  # fmt: skip
    trainer = Trainer(config)
    uc = trainer.unet_config
    assert (uc.in_channels, uc.out_channels, uc.num_classes, uc.sample_size) == (2, 1, 51, 28)
    assert trainer.num_classes is None  # the digit labels are not used
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.6 * losses[0], losses

    model = tmp_path / "run" / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert (index["task"], index["scale"], index["max_noise_level"], index["downsample"]) == (
        "super-resolution", 4, 50, "bicubic")  # fmt: skip
    pipe = load_sr_pipeline(model)
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v)
    low = torch.rand(2, 1, 7, 7)
    out = pipe(low, steps=3, sampler="ddim", noise_level=10, generator=torch.Generator().manual_seed(0),
               show_progress=False).images  # fmt: skip
    assert out.shape == (2, 1, 28, 28) and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(WeightsError, match="diffusekit upscale"):
        identify(model)  # the Stable Diffusion loader names the command that reads it
    with pytest.raises(ConfigError, match="diffusekit upscale"):
        load_for_sampling(tmp_path / "run")
    strip = tmp_path / "run" / "samples" / "step-00000040.png"
    assert strip.is_file()  # low-res | bicubic | model | truth


def test_resume_of_a_super_resolution_run_is_bit_identical(tmp_path):
    images, labels = _images()
    task = {"scale": 2, "downsample": "area", "blur_sigma": 0.5, "noise_std": 0.05, "max_noise_level": 20}
    full = Trainer(sr_config(tmp_path / "a", task), dataset=ArrayDataset(images, labels))
    full.fit()
    first = Trainer(sr_config(tmp_path / "b", task, max_steps=2), dataset=ArrayDataset(images, labels))
    first.fit()
    resumed = Trainer(sr_config(tmp_path / "b", task), dataset=ArrayDataset(images, labels), resume="latest")
    assert resumed.step == 2 and resumed.sr is not None
    resumed.fit()
    assert_resumed_run_equals(full, resumed, tmp_path / "a" / "run", tmp_path / "b" / "run")


def test_task_options_are_checked(tmp_path):
    images, labels = _images()
    with pytest.raises(ConfigError, match="task.kind"):
        TrainConfig().replace(task={"kind": "inpaint"})
    with pytest.raises(ConfigError, match="task.scale"):
        TrainConfig().replace(task={"kind": "super-resolution", "scale": 1})
    with pytest.raises(ConfigError, match="not a multiple of task.scale 3"):
        Trainer(sr_config(tmp_path, {"scale": 3}), dataset=ArrayDataset(images, labels))
    with pytest.raises(ConfigError, match="model.class_conditional"):
        Trainer(sr_config(tmp_path, {"scale": 2}).replace(model={"class_conditional": True}),
                dataset=ArrayDataset(images, labels))  # fmt: skip


def test_cli_train_task_options(tmp_path, capsys):
    from diffusekit.cli.main import main

    code = main(["train", "--task", "super-resolution", "--scale", "2", "--downsample", "area", "--noise-aug-levels",
                 "7", "--degrade-noise", "0.1", "--blur-sigma", "0.4", "--print-config"])  # fmt: skip
    assert code == 0
    task = json.loads(capsys.readouterr().out)["task"]
    assert task == {"kind": "super-resolution", "scale": 2, "downsample": "area", "blur_sigma": 0.4,
                    "noise_std": 0.1, "max_noise_level": 7, "crop_px": 0}  # fmt: skip
