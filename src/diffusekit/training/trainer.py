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
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import CheckpointError, ConfigError, DiffusekitError
from diffusekit.io.atomic import check_writable_folder
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.training import distributed as ddp
from diffusekit.training.batches import StreamBatchSampler, make_batches
from diffusekit.training.checkpoint import (
    latest_checkpoint,
    save_checkpoint,
    step_dir_name,
)
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import DataSpec, TrainDataset, default_random_flip, load_dataset
from diffusekit.training.ema import ema_decay, ema_update, make_ema
from diffusekit.training.export import EXPORT_DIR, export_inference, sampler_config
from diffusekit.training.interrupt import on_sigint, request_stop
from diffusekit.training.losses import loss_inputs, offset_noise, weighted_mse
from diffusekit.training.lr_schedule import lr_factor
from diffusekit.training.memory import check_training_memory
from diffusekit.training.monitor import MetricsLogger, plot_loss_curve, read_metrics
from diffusekit.training.precision import resolve_precision
from diffusekit.training.presets import build_unet_config
from diffusekit.training.randomness import BatchRandomness, micro_batch_generator, seed_everything
from diffusekit.training.resume import CHECKPOINTS_DIR, checkpoint_payload, find_resume_state, restore_state
from diffusekit.training.super_resolution import PREVIEW_COLUMNS, SuperResolution

SAMPLES_DIR = "samples"


class TrainingDiverged(DiffusekitError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without writing bad weights."""


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns."""

    run_dir: Path
    step: int
    stopped_by: str  # "max_steps", "max_minutes" or "interrupted" (Ctrl-C / SIGINT; the checkpoint was saved)
    checkpoint: Path | None
    export_dir: Path | None
    loss: float | None  # mean loss of the last logging interval
    train_seconds: float  # wall-clock time of this invocation's optimizer steps
    steps_per_second: float


class Trainer:
    """Trains a U-Net on a dataset as a ``TrainConfig`` says; ``fit()`` runs to the end of the budget.

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
        config.validate()
        self.env = env or ddp.init_distributed(config.run.device)
        self.on_step_end = on_step_end
        state = find_resume_state(resume, config.run.output_dir) if resume is not None else None
        if state is not None:
            for key in ("train", "unet"):  # what the trainer itself writes; a hand-edited file may lack them
                if not isinstance(state.config.get(key), dict):
                    raise CheckpointError(f"{state.path}: config.json: {key} must be a JSON object")
            try:  # the saved config with this run's loop settings (checked together: they replace old ones)
                config = TrainConfig.from_dict({**state.config["train"], "run": config.to_dict()["run"]})
            except ConfigError as e:
                raise CheckpointError(f"{state.path}: config.json: {e}") from None
        self.config = c = config
        self.run_dir = Path(c.run.output_dir)
        if self.env.is_main:
            check_writable_folder(self.run_dir, f"run.output_dir {self.run_dir}")
        if state is not None and state.step >= c.run.max_steps:
            raise ConfigError(
                f"{state.path} is at step {state.step} and run.max_steps is {c.run.max_steps}: there is nothing "
                f"to train; to continue, pass a run.max_steps above {state.step}"
            )

        # data
        self.dataset = dataset or load_dataset(
            DataSpec(
                source=c.data.source,
                resolution=c.data.resolution,
                channels=c.data.channels,
                data_root=c.data.data_root,
                limit=c.data.limit,
                skip_bad_images=c.data.skip_bad_images,
            )
        )
        ds = self.dataset
        self.random_flip = c.data.random_flip if c.data.random_flip is not None else default_random_flip(c.data.source)
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
        self.model = prepare(UNet(self.unet_config), plan, device=device)
        self.ema = make_ema(self.model)
        o = c.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.schedule = NoiseSchedule.from_name(
            c.diffusion.beta_schedule,
            c.diffusion.num_train_timesteps,
            c.diffusion.beta_start,
            c.diffusion.beta_end,
            c.diffusion.zero_terminal_snr,
        )
        self.autocast_dtype = resolve_precision(c.run.mixed_precision, device)
        self.scaler = (
            torch.amp.GradScaler("cuda") if device.type == "cuda" and self.autocast_dtype == torch.float16 else None
        )

        self.step = 0
        self.data_position = 0  # examples consumed from the data stream (all ranks together)
        self.train_seconds_total = 0.0
        self.log_window: list[float] = []  # losses of the steps since the last metrics record
        self.resumed_from: Path | None = None
        seed_everything(c.run.seed, self.env.rank)
        if state is not None:
            restore_state(self, state)
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if self.env.distributed
            else None
        )

    # ------------------------------------------------------------------------------------------- parts
    @property
    def global_batch(self) -> int:
        """Examples per micro-batch over all ranks."""
        return self.config.optim.batch_size * self.env.world_size

    def save_checkpoint(self) -> Path:
        """Write the current state (rank 0 writes; every rank returns the checkpoint's path)."""
        path = self.run_dir / CHECKPOINTS_DIR / step_dir_name(self.step)
        if self.env.is_main:
            path = save_checkpoint(
                self.run_dir / CHECKPOINTS_DIR,
                self.step,
                keep=self.config.run.keep_checkpoints,
                **checkpoint_payload(self),
            )
        ddp.barrier(self.env)
        return path

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        use_ema: bool = True,
    ) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from the EMA (or raw) weights with DDIM (Song et al. 2021)."""
        from diffusekit.pipelines.unconditional import UnconditionalPipeline

        net = self.ema if use_ema else self.model
        was_training = net.training
        pipe = UnconditionalPipeline(net.eval(), sampler_config(self.config.diffusion, "ddim"))
        out = pipe(
            n,
            steps=steps or self.config.run.sample_steps,
            generator=torch.Generator().manual_seed(seed),
            class_labels=class_labels,
            guidance_scale=guidance_scale,
            show_progress=False,
        )
        net.train(was_training)
        return out

    def preview_labels(self, n: int) -> Tensor | None:
        """Class labels for preview grids: column j of a grid with num_classes columns shows class j."""
        return None if self.num_classes is None else torch.arange(n) % self.num_classes

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train until run.max_steps or run.max_minutes; checkpoint, export the EMA model and plot the loss."""
        c, env = self.config, self.env
        model = self.ddp_model or self.model
        model.train()
        main = env.is_main
        logger = (
            MetricsLogger(
                self.run_dir, resume_step=self.step if self.resumed_from else None, tensorboard=c.run.tensorboard
            )
            if main
            else None
        )
        sampler = StreamBatchSampler(
            len(self.dataset),
            c.optim.batch_size,
            c.run.seed,
            start=self.data_position,
            rank=env.rank,
            world_size=env.world_size,
        )
        workers = c.data.num_workers if c.data.num_workers is not None else min(4, os.cpu_count() or 1)
        batches = make_batches(self.dataset, sampler, num_workers=workers, pin_memory=env.device.type == "cuda")
        bar = tqdm(
            total=c.run.max_steps if c.run.max_minutes is None else None,  # a time budget: budget_left is the ETA
            initial=self.step,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            disable=not (main and c.run.progress),
            file=sys.stderr,
        )
        if main:
            self._print_header()
        accum = c.optim.grad_accum_steps
        budget = c.run.max_minutes * 60 if c.run.max_minutes is not None else math.inf
        amp = (
            torch.autocast(env.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        start_step, t_start = self.step, time.perf_counter()
        interval_steps, interval_start = 0, time.perf_counter()
        last_loss, last_ckpt, stopped_by = None, None, "max_steps"
        interrupted = threading.Event()
        previous_handler = on_sigint(lambda: request_stop(interrupted))
        try:
            while True:
                elapsed = time.perf_counter() - t_start
                stop = self.step >= c.run.max_steps or elapsed >= budget or interrupted.is_set()
                if env.distributed:  # rank 0's clock (and Ctrl-C) decides, so every rank stops at the same step
                    flag = torch.tensor([float(stop)], device=env.device)
                    torch.distributed.broadcast(flag, 0)
                    stop = bool(flag.item())
                if stop:
                    if self.step >= c.run.max_steps:
                        stopped_by = "max_steps"
                    else:
                        stopped_by = "max_minutes" if elapsed >= budget else "interrupted"
                    break
                lr = c.optim.lr * lr_factor(self.step, c.optim, c.run.max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=env.device)
                for a in range(accum):
                    x0, labels = next(batches)
                    loss_sum += self._accumulate(model, x0, labels, self.step * accum + a, last=a == accum - 1, amp=amp)
                self.data_position += accum * self.global_batch
                mean_loss, grad_norm = self._optimizer_step(loss_sum / accum, last_ckpt)
                self.step += 1
                decay = ema_decay(self.step, c.ema.decay, c.ema.warmup)
                ema_update(self.ema, self.model, decay)
                self.log_window.append(mean_loss)
                interval_steps += 1
                bar.update(1)

                if self.step % c.run.log_every == 0 or self.step == c.run.max_steps:
                    now = time.perf_counter()
                    rate = interval_steps / max(now - interval_start, 1e-9)
                    # the whole window, also where it began before a resume (its losses are in the checkpoint)
                    last_loss = sum(self.log_window) / len(self.log_window)
                    record = {
                        "step": self.step,
                        "loss": last_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "ema_decay": decay,
                        "steps_per_s": rate,
                        "images_per_s": rate * accum * self.global_batch,
                        "elapsed_s": self.train_seconds_total + now - t_start,
                    }
                    if logger is not None:
                        logger.log(record)
                    postfix = {"loss": f"{last_loss:.4f}", "lr": f"{lr:.2e}"}
                    if math.isfinite(budget):
                        postfix["budget_left"] = _mmss(budget - (now - t_start))
                    bar.set_postfix(postfix, refresh=False)
                    interval_steps, interval_start = 0, now
                    if self.step % c.run.log_every == 0:  # the extra record of a run's last step keeps its window
                        self.log_window = []
                if self.step % c.run.checkpoint_every == 0:
                    last_ckpt = self.save_checkpoint()
                if c.run.sample_every and self.step % c.run.sample_every == 0 and main:
                    self._write_samples(logger)
                if self.on_step_end is not None:
                    self.on_step_end(self, self.step)
        except BaseException:
            if logger is not None:
                logger.close()
            raise
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        train_seconds = time.perf_counter() - t_start
        self.train_seconds_total += train_seconds
        if last_ckpt is None or last_ckpt.name != step_dir_name(self.step):
            last_ckpt = self.save_checkpoint()
        export_dir = None
        if main:
            export_dir = export_inference(self.ema, c.diffusion, self.run_dir / EXPORT_DIR, task=c.task)
            plot_loss_curve(read_metrics(logger.path), self.run_dir / "loss_curve.png")
            logger.close()
        ddp.barrier(env)
        steps_done = self.step - start_step
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            stopped_by=stopped_by,
            checkpoint=last_ckpt,
            export_dir=export_dir,
            loss=last_loss,
            train_seconds=train_seconds,
            steps_per_second=steps_done / train_seconds if train_seconds > 0 else 0.0,
        )

    def _accumulate(
        self,
        model: torch.nn.Module,
        x0: Tensor,
        labels: Tensor | None,
        micro: int,
        *,
        last: bool,
        amp: contextlib.AbstractContextManager,
    ) -> Tensor:
        """Forward and backward of this rank's slice of global micro-batch ``micro`` (DDPM Algorithm 1, lines
        2-5); gradients accumulate (DDP synchronises them on the ``last`` micro-batch). Returns the loss."""
        c, env = self.config, self.env
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

    def _optimizer_step(self, loss: Tensor, last_ckpt: Path | None) -> tuple[float, float]:
        """Check the (all-reduced) loss, clip the gradient norm, step AdamW. Returns (loss, grad norm)."""
        mean_loss = float(ddp.all_reduce_mean(loss, self.env))
        if not math.isfinite(mean_loss):
            self._diverged("loss", mean_loss, last_ckpt)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip_norm if self.config.optim.grad_clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
            self.scaler.update()
        else:
            if not math.isfinite(grad_norm):
                self._diverged("gradient norm", grad_norm, last_ckpt)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm

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

    def _diverged(self, what: str, value: float, last_ckpt: Path | None) -> None:
        ckpt = last_ckpt or latest_checkpoint(self.run_dir / CHECKPOINTS_DIR)
        where = (
            f"the last good checkpoint is {ckpt}; resume from it with --resume {ckpt}"
            if ckpt
            else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"the {what} became {value} at step {self.step + 1} (stopping before the optimizer step, so no bad "
            f"weights were saved); {where}. Try a lower optim.lr, gradient clipping (optim.grad_clip_norm) or "
            "run.mixed_precision='no'."
        )

    def _print_header(self) -> None:
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
        print("\n".join(lines), file=sys.stderr, flush=True)


def _mmss(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"
