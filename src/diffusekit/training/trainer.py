"""The training loop of a pixel-space diffusion model (DDPM, Ho et al. 2020, Algorithm 1).

Each optimizer step: for each of ``grad_accum_steps`` micro-batches take x0 from the data stream, draw
t ~ U{0..T-1} and eps ~ N(0, I), form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4) and regress the
network's output on the eps / x0 / v target (eq. 14), optionally Min-SNR-gamma weighted (Hang et al. 2023);
then clip the gradient norm, take an AdamW step and update the EMA of the weights.

Reproducibility: all randomness of a micro-batch (t, eps, flips, offset noise, label dropout) is drawn for
the whole global batch from a generator seeded by (seed, micro-batch index), and each rank takes its slice;
the data order is a pure function of (seed, stream position). So a resumed run continues bit for bit, and
N processes compute the same gradient as one process with the same global batch (up to float rounding).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.training import distributed as ddp
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import TrainDataset, dataset_from_config, random_flip_of
from diffusekit.training.export import EXPORT_DIR, export_inference, sampler_config
from diffusekit.training.loop import SAMPLES_DIR, TrainingDiverged, TrainingLoop, TrainResult
from diffusekit.training.losses import loss_inputs, offset_noise, weighted_mse
from diffusekit.training.memory import check_training_memory
from diffusekit.training.monitor import MetricsLogger
from diffusekit.training.presets import build_unet_config
from diffusekit.training.randomness import BatchRandomness, micro_batch_generator
from diffusekit.training.super_resolution import PREVIEW_COLUMNS, SuperResolution

__all__ = ["SAMPLES_DIR", "Trainer", "TrainResult", "TrainingDiverged"]


class Trainer(TrainingLoop):
    """Trains a U-Net on a dataset as a ``TrainConfig`` says; ``fit()`` (training.loop) runs to the end of the budget.

    ``resume``: a checkpoint folder, a run folder, or "latest" (the newest intact checkpoint in
    ``run.output_dir``). On resume the checkpoint's own config is used; only the ``run`` section's loop
    settings (steps, time budget, intervals, output) may change. ``dataset`` overrides ``config.data``
    (e.g. an in-memory ``ArrayDataset``). ``on_step_end(trainer, step)`` is called after every optimizer
    step, after any checkpoint of that step was written.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | os.PathLike | None = None,
        dataset: TrainDataset | None = None,
        env: ddp.DistEnv | None = None,
        on_step_end: Callable[[Trainer, int], None] | None = None,
    ) -> None:
        super().__init__(config, resume=resume, env=env, on_step_end=on_step_end)
        c, state = self.config, self.resume_state
        # data
        self.dataset = dataset or dataset_from_config(c.data)
        ds = self.dataset
        self.random_flip = random_flip_of(c.data)
        conditional = c.model.class_conditional if c.model.class_conditional is not None else ds.num_classes > 0
        if conditional and ds.num_classes == 0:
            raise ConfigError("model.class_conditional is on but the dataset has no labels (class sub-folders)")
        self.sr = SuperResolution.for_run(c, ds.resolution)  # None unless task.kind is super-resolution
        self.num_classes = ds.num_classes if conditional and self.sr is None else None
        self.train_size = self.sr.size if self.sr else ds.resolution  # the side the network trains on

        # model, EMA, optimizer (identical initial weights on every rank)
        torch.manual_seed(c.run.seed)
        if state is not None:
            try:
                self.unet_config = UNetConfig.from_dict(state.config["unet"])
            except ConfigError as e:
                raise CheckpointError(f"{state.path}: config.json: unet: {e}") from None
            if (self.unet_config.out_channels, self.unet_config.sample_size) != (ds.channels, self.train_size):
                raise ConfigError(
                    f"the checkpoint's model takes {self.unet_config.in_channels}-channel "
                    f"{self.unet_config.sample_size}px images, the data has {ds.channels}-channel {self.train_size}px"
                )
        else:
            self.unet_config = build_unet_config(
                c.model.preset,
                c.model.overrides,
                channels=ds.channels,
                resolution=ds.resolution,
                num_classes=self.num_classes,
            )
        self.unet_config = self.sr.unet_config(self.unet_config) if self.sr else self.unet_config
        device = self.env.device
        check_training_memory(self.unet_config, channels=self.unet_config.in_channels, resolution=self.train_size,
                              batch_size=c.optim.batch_size, device=device)  # fmt: skip
        # channels-last on CPUs: oneDNN's NHWC convolutions and GroupNorm are faster there (one mnist-small
        # training step of 64 images: 1.71 s vs 2.20 s NCHW on one core); the weights' values are the same
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        # the training plan: float32 weights (autocast picks the compute dtype), train mode, and on the CPU
        # the Winograd 3x3 convolutions where they are faster (128+ channels; runtime.fastconv)
        plan = Plan(dtype=torch.float32, channels_last=device.type == "cpu", inference=False)
        self.schedule = NoiseSchedule.from_name(
            c.diffusion.beta_schedule,
            c.diffusion.num_train_timesteps,
            c.diffusion.beta_start,
            c.diffusion.beta_end,
            c.diffusion.zero_terminal_snr,
        )
        self._init_training(prepare(UNet(self.unet_config), plan, device=device))

    # ------------------------------------------------------------------------------------------- parts
    CONFIG_KEYS = ("train", "unet")

    def checkpoint_config(self) -> dict[str, Any]:
        """The run's config, the U-Net's and the dataset's shape and classes."""
        ds = self.dataset
        return {
            "train": self.config.to_dict(),
            "unet": self.unet_config.to_dict(),
            "dataset": {
                "size": len(ds),
                "channels": ds.channels,
                "resolution": ds.resolution,
                "num_classes": ds.num_classes,
                "class_names": list(ds.class_names),
            },
        }

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        guide: torch.nn.Module | None = None,
        guide_labels: str = "class",
        use_ema: bool = True,
        sampler: str = "ddim",
        sampler_options: dict[str, Any] | None = None,
    ) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from the EMA (or raw) weights with ``sampler`` (default DDIM, Song
        et al. 2021; with the EDM preconditioning every sampler runs on the Karras et al. 2022 grid).
        ``sampler_options``: other SamplerConfig fields, e.g. Heun's churn (``s_churn``, Karras et al. 2022,
        Alg. 2); ``guidance_interval``: the noise levels (lo, hi] where the guidance applies (Kynkäänniemi et
        al. 2024; default: all); ``guide``: a weaker version of the model (e.g. an earlier EMA of this run) that
        makes ``guidance_scale`` autoguidance (Karras et al. 2024) instead of classifier-free guidance, the guide
        seeing each image's class or, with ``guide_labels`` ``none``, the "no class" label."""
        from diffusekit.pipelines.unconditional import UnconditionalPipeline

        net = self.ema if use_ema else self.model
        was_training = net.training
        config = sampler_config(self.config.diffusion, sampler).with_sampler(sampler, **(sampler_options or {}))
        pipe = UnconditionalPipeline(net.eval(), config)
        out = pipe(
            n,
            steps=steps or self.config.run.sample_steps,
            generator=torch.Generator().manual_seed(seed),
            class_labels=class_labels,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            guide=guide,
            guide_labels=guide_labels,
            show_progress=False,
        )
        net.train(was_training)
        return out

    def preview_labels(self, n: int) -> Tensor | None:
        """Class labels for preview grids: column j of a grid with num_classes columns shows class j."""
        return None if self.num_classes is None else torch.arange(n) % self.num_classes

    # ------------------------------------------------------------------------------------------- hooks
    def _export(self) -> Path:
        return export_inference(self.ema, self.config.diffusion, self.run_dir / EXPORT_DIR, task=self.config.task)

    def _accumulate(
        self,
        model: torch.nn.Module,
        batch: tuple[Tensor, Tensor | None],
        micro: int,
        *,
        last: bool,
        amp: contextlib.AbstractContextManager,
    ) -> Tensor:
        """Forward and backward of this rank's slice of global micro-batch ``micro`` (DDPM Algorithm 1, lines
        2-5); gradients accumulate (DDP synchronises them on the ``last`` micro-batch). Returns the loss."""
        c, env = self.config, self.env
        x0, labels = batch
        B = c.optim.batch_size
        shape = (self.dataset.channels, self.train_size, self.train_size)
        rnd = BatchRandomness.draw(micro_batch_generator(c.run.seed, micro), self.global_batch, shape,
                                   self.schedule.num_train_timesteps, c.diffusion.label_dropout)  # fmt: skip
        rnd = rnd.slice(env.rank * B, (env.rank + 1) * B)
        x0 = x0.to(env.device, non_blocking=True)  # (B, C, H, W)
        if self.random_flip:
            x0 = torch.where(rnd.flip.to(env.device)[:, None, None, None], x0.flip(-1), x0)
        noise = rnd.noise.to(env.device)
        if c.diffusion.offset_noise:
            noise = offset_noise(noise, rnd.offset.to(env.device), c.diffusion.offset_noise)
        if self.num_classes is not None:  # label dropout: the last class id means "no class" (CFG)
            labels = torch.where(rnd.drop_label, self.num_classes, labels).to(env.device)
        else:
            labels = None
        if self.sr is not None:  # x0 becomes this micro-batch's crops, when cropping
            x0, concat, labels = self.sr.condition(x0, micro, env.rank * B, self.global_batch)
        else:
            concat = None
        x_t, t, target, weights = loss_inputs(self.schedule, c.diffusion, x0, noise, rnd.t.to(env.device), rnd.normal)
        x_t = x_t.contiguous(memory_format=self.memory_format)
        sync = self.ddp_model is None or last
        with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
            with amp:
                out = model(x_t, t, class_labels=labels, concat=concat)
            loss = weighted_mse(out, target, weights)
            scaled = loss / c.optim.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _write_samples(self, logger: MetricsLogger | None) -> Path:
        from diffusekit.io.images import make_grid, save_image_grid

        n = self.config.run.num_sample_images
        labels = self.preview_labels(n)
        images = self.sr.preview(self, n) if self.sr else self.sample(n, seed=self.config.run.seed, class_labels=labels)
        nrow = PREVIEW_COLUMNS if self.sr else self.num_classes or None
        path = save_image_grid(images, self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png", nrow=nrow, scale=2)
        if logger is not None:
            logger.log_images("samples/ema_ddim", make_grid(images, nrow=nrow), self.step)
        return path

    def _header_lines(self) -> list[str]:
        c, ds = self.config, self.dataset
        n_params = sum(p.numel() for p in self.model.parameters())
        prec = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaling"}
        cond = f"class-conditional ({self.num_classes} classes + 'no class')" if self.num_classes else "unconditional"
        if self.sr is not None:
            cond = f"super-resolution x{c.task.scale}"
        edm = c.diffusion.preconditioning == "edm"
        target = "EDM preconditioning" if edm else f"{c.diffusion.prediction_type} target"
        lines = [
            f"diffusekit train: {len(ds)} images {ds.channels}x{ds.resolution}x{ds.resolution} from {c.data.source!r}",
            f"  model: {c.model.preset} U-Net, {n_params / 1e6:.2f}M parameters, {cond}, {target}",
            f"  batch: {c.optim.batch_size} x {c.optim.grad_accum_steps} accumulation x {self.env.world_size} "
            f"process(es) = {c.optim.batch_size * c.optim.grad_accum_steps * self.env.world_size} per step; "
            f"device {self.env.device}, {prec[self.autocast_dtype]}",
            f"  run folder: {self.run_dir}" + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
        ]
        return lines

