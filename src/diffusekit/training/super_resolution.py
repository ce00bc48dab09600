"""The super-resolution task of the trainer (SR3, Saharia et al. 2021, "Image Super-Resolution via Iterative
Refinement"): how a batch of high-resolution training images becomes the network's condition.

For each clean image x0 (B, C, H, W) in [-1, 1], after the trainer's flips:

0. with ``task.crop_px`` > 0, a random ``crop_px`` x ``crop_px`` window of it (a new window for every example of
   every micro-batch: large images are learned at full detail, and the model's training size is the crop's);
1. degradation: an optional Gaussian blur (``task.blur_sigma`` pixels), a ``task.scale`` times smaller copy
   (``task.downsample``: bicubic or area; :func:`diffusekit.pipelines.super_resolution.downsample`) and
   optional Gaussian noise of standard deviation ``task.noise_std``: the low-resolution input y;
2. the condition: y bicubically upsampled back to H x W (SR3 sec. 2.4), optionally noised to a random level
   0..``task.max_noise_level`` (noise conditioning augmentation, Ho et al. 2022, sec. 4.2), which becomes the
   class label;

the network sees [x_t, condition] stacked on the channels and regresses the usual target. The draws (crop
windows included) come from
a generator seeded by (seed, micro-batch index) for the whole global batch, each rank taking its slice, like
every other draw of the trainer (:mod:`diffusekit.training.randomness`): a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNetConfig
from diffusekit.pipelines.super_resolution import (
    TASK,
    SuperResolutionPipeline,
    downsample,
    noise_condition,
    upsample_condition,
)
from diffusekit.training.config import TaskConfig, TrainConfig
from diffusekit.training.export import sampler_config

if TYPE_CHECKING:
    from diffusekit.training.trainer import Trainer

PREVIEW_COLUMNS = 4  # low-res (nearest) | bicubic | model | ground truth


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """``images`` (B, C, H, W) convolved with a normalised Gaussian of ``sigma`` pixels (radius ceil(3 sigma),
    edges reflected); sigma 0 returns them unchanged."""
    if sigma == 0:
        return images
    r = max(1, int(np.ceil(3 * sigma)))
    r = min(r, images.shape[-1] - 1, images.shape[-2] - 1)  # reflection padding needs a pad below the size
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).to(images.dtype).to(images.device)
    c = images.shape[1]
    out = F.pad(images, (r, r, r, r), mode="reflect")
    out = F.conv2d(out, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows
    return F.conv2d(out, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # columns


def degrade(x0: Tensor, task: TaskConfig, noise: Tensor | None = None) -> Tensor:
    """The low-resolution input (B, C, H/s, W/s) of clean ``x0`` (B, C, H, W) in [-1, 1]: blur, downsample,
    then ``task.noise_std`` times ``noise`` (standard normal, of the low-resolution shape) added."""
    y = downsample(gaussian_blur(x0, task.blur_sigma), task.scale, task.downsample)
    if task.noise_std:
        if noise is None:
            raise ConfigError("task.noise_std > 0 needs the noise to add")
        y = y + task.noise_std * noise.to(y.dtype)
    return y


@dataclasses.dataclass
class SRDraws:
    """The super-resolution task's randomness for one global micro-batch."""

    degrade_noise: Tensor  # (B, C, H/s, W/s) standard normal
    levels: Tensor  # (B,) int64 conditioning noise levels in [0, max_noise_level]
    cond_noise: Tensor  # (B, C, H, W) standard normal
    corners: Tensor  # (B, 2) int64 (top, left) of each crop window, each in [0, room]

    @classmethod
    def draw(
        cls, seed: int, micro: int, batch: int, shape: tuple[int, int, int], task: TaskConfig, room: int = 0
    ) -> SRDraws:
        """The draws for ``batch`` training examples of ``shape`` (C, H, W) (the crop's, when cropping) whose
        crop windows may start anywhere in 0..``room`` on each axis (0: no cropping)."""
        c, h, w = shape
        state = np.random.SeedSequence([seed, micro, 0x5E3]).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        return cls(
            degrade_noise=torch.randn((batch, c, h // task.scale, w // task.scale), generator=g),
            levels=torch.randint(0, task.max_noise_level + 1, (batch,), generator=g),
            cond_noise=torch.randn((batch, c, h, w), generator=g),
            # drawn last: the draws above stay those of a run without crops
            corners=torch.randint(0, room + 1, (batch, 2), generator=g),
        )

    def slice(self, start: int, stop: int) -> SRDraws:
        return SRDraws(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


def crop_windows(images: Tensor, corners: Tensor, size: int) -> Tensor:
    """The ``size`` x ``size`` windows (B, C, size, size) of ``images`` (B, C, H, W) whose top-left pixels are
    ``corners`` (B, 2) (row, column); every window must lie inside its image."""
    b, c = images.shape[:2]
    r = torch.arange(size, device=images.device)
    rows = corners[:, 0:1].to(images.device) + r  # (B, size)
    cols = corners[:, 1:2].to(images.device) + r  # (B, size)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return images[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, size, size)


class SuperResolution:
    """The task's part of a training run: the network's shape and each micro-batch's condition.

    ``resolution`` is the data's image side, ``size`` the side the network trains on (``task.crop_px``, or the
    whole image)."""

    def __init__(self, task: TaskConfig, seed: int, schedule: NoiseSchedule, resolution: int) -> None:
        self.task, self.seed, self.schedule, self.resolution = task, seed, schedule, resolution
        self.size = task.crop_px or resolution

    @classmethod
    def for_run(cls, config: TrainConfig, resolution: int) -> SuperResolution | None:
        """The task of ``config`` (None for ``generate``), checked against the data's ``resolution``. The
        condition is noised by the schedule of the run's exported sampler config, as the pipeline noises it."""
        task = config.task
        if task.kind != TASK:
            return None
        if config.model.class_conditional:
            raise ConfigError("model.class_conditional does not apply to task.kind 'super-resolution' (the class "
                              "label carries the conditioning noise level); leave it unset")  # fmt: skip
        if task.crop_px > resolution:
            raise ConfigError(f"task.crop_px {task.crop_px} is larger than the data's {resolution}px images; choose "
                              f"a crop of at most {resolution} pixels, or a larger data.resolution")  # fmt: skip
        size = task.crop_px or resolution
        if size % task.scale:
            fit = size - size % task.scale or task.scale
            what = f"task.crop_px {size}" if task.crop_px else f"data resolution {size}"
            where = "task.crop_px" if task.crop_px else "data.resolution"
            raise ConfigError(f"{what} is not a multiple of task.scale {task.scale}; set {where} to a multiple "
                              f"(e.g. {fit})")  # fmt: skip
        schedule = sampler_config(config.diffusion).schedule()
        if task.max_noise_level > schedule.num_train_timesteps:
            raise ConfigError(f"task.max_noise_level {task.max_noise_level} is past the "
                              f"{schedule.num_train_timesteps} timesteps of diffusion.num_train_timesteps")
        return cls(task, config.run.seed, schedule, resolution)

    def unet_config(self, base: UNetConfig) -> UNetConfig:
        """``base`` taking [x_t, condition] (2 C channels) at the training size and, with noise augmentation, a
        class table of the levels 0..max_noise_level."""
        levels = self.task.max_noise_level
        return dataclasses.replace(base, in_channels=2 * base.out_channels, sample_size=self.size,
                                   num_classes=levels + 1 if levels else None)  # fmt: skip

    def condition(self, x0: Tensor, micro: int, start: int, global_batch: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(the training images (B, C, S, S), their condition (B, C, S, S), class labels (B,) or None) for this
        rank's slice ``x0`` (B, C, R, R) of global micro-batch ``micro``, which begins at example ``start``;
        S is ``size``: a random window of each image when cropping, else the whole image."""
        b, c = x0.shape[:2]
        room = self.resolution - self.size
        rnd = SRDraws.draw(self.seed, micro, global_batch, (c, self.size, self.size), self.task, room)
        rnd = rnd.slice(start, start + b)
        if room:
            x0 = crop_windows(x0, rnd.corners, self.size)
        low = degrade(x0.float(), self.task, rnd.degrade_noise.to(x0.device))
        cond = upsample_condition(low, self.task.scale)
        if not self.task.max_noise_level:
            return x0, cond, None
        levels = rnd.levels.to(x0.device)
        return x0, noise_condition(cond, levels, rnd.cond_noise.to(x0.device), self.schedule), levels

    @torch.no_grad()
    def preview(self, trainer: Trainer, n: int) -> Tensor:
        """Rows of low-res (nearest) | bicubic | the EMA model's output | ground truth for the first ``n``
        training images (their centre windows, when cropping), (4 n, C, S, S) in [0, 1] (DDIM,
        ``run.sample_steps`` steps, seed ``run.seed``)."""
        c, s = trainer.config, self.task.scale
        x0 = trainer.dataset.batch(list(range(min(n, len(trainer.dataset)))))[0].float()  # (n, C, R, R)
        middle = (self.resolution - self.size) // 2
        x0 = crop_windows(x0, torch.full((x0.shape[0], 2), middle), self.size)  # (n, C, S, S)
        low = degrade(x0, self.task, torch.zeros(x0.shape[0], x0.shape[1], x0.shape[2] // s, x0.shape[3] // s))
        low01 = ((low + 1) / 2).clamp(0, 1)
        net = trainer.ema
        was_training = net.training
        pipe = SuperResolutionPipeline(net.eval(), sampler_config(c.diffusion, "ddim"), scale=s,
                                       max_noise_level=self.task.max_noise_level, downsample=self.task.downsample)
        ours = pipe(low01.to(next(net.parameters()).device), steps=c.run.sample_steps, show_progress=False,
                    generator=torch.Generator().manual_seed(c.run.seed)).images.cpu()  # fmt: skip
        net.train(was_training)
        bicubic = ((upsample_condition(low, s) + 1) / 2).clamp(0, 1)
        nearest = F.interpolate(low01, scale_factor=s, mode="nearest")
        return torch.stack([nearest, bicubic, ours, (x0 + 1) / 2], dim=1).flatten(0, 1)


__all__ = ["PREVIEW_COLUMNS", "SRDraws", "SuperResolution", "crop_windows", "degrade", "gaussian_blur"]
