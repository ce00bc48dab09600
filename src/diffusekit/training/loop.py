"""The training loop every trainer shares: steps, budget, optimizer, EMA, checkpoints, exact resume, logging.

A trainer is a subclass of ``TrainingLoop`` that builds its model and data in ``__init__`` (then calls
``_init_training``) and supplies what is specific to it:

- ``_accumulate(model, batch, micro, last=, amp=)``: forward and backward of this rank's slice of global
  micro-batch ``micro`` (its randomness drawn from ``micro_batch_generator(seed, micro)`` so that resume is
  exact and N processes match one); returns the detached loss;
- ``_write_samples(logger)``: a preview grid under ``run_dir/samples``;
- ``_export()``: the inference folder written from the EMA weights at the end (rank 0);
- ``extra_metrics()``: numbers added to each metrics record (e.g. the terms of a composite loss);
- ``_header_lines()``: what the run prints first; ``checkpoint_config()``: the config a checkpoint records
  (its ``CONFIG_KEYS`` sections are checked on resume).

The loop itself (one optimizer step): ``grad_accum_steps`` micro-batches, the divergence check, gradient-norm
clipping, an AdamW step over the parameters that require grad, the EMA update, a metrics record every
``log_every`` steps, checkpoints every ``checkpoint_every`` steps, previews every ``sample_every`` steps;
it stops at ``run.max_steps``, after ``run.max_minutes`` or on Ctrl-C (a checkpoint is written either way).
The config needs ``run``, ``optim``, ``ema`` sections of ``training.config`` and ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from diffusekit.errors import CheckpointError, ConfigError, DiffusekitError
from diffusekit.io.atomic import check_writable_folder
from diffusekit.training import distributed as ddp
from diffusekit.training.batches import StreamBatchSampler, make_batches
from diffusekit.training.checkpoint import TrainingState, latest_checkpoint, save_checkpoint, step_dir_name
from diffusekit.training.ema import ema_decay, ema_update, make_ema
from diffusekit.training.interrupt import on_sigint, request_stop
from diffusekit.training.lr_schedule import lr_factor
from diffusekit.training.monitor import MetricsLogger, plot_loss_curve, read_metrics
from diffusekit.training.power_ema import SNAPSHOT_DIR, PowerEMA, power_beta
from diffusekit.training.precision import resolve_precision
from diffusekit.training.randomness import seed_everything
from diffusekit.training.resume import CHECKPOINTS_DIR, checkpoint_payload, find_resume_state, restore_state

SAMPLES_DIR = "samples"


class TrainingDiverged(DiffusekitError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped without writing bad weights."""


@dataclass
class TrainResult:
    """What ``TrainingLoop.fit`` returns."""

    run_dir: Path
    step: int
    stopped_by: str  # "max_steps", "max_minutes" or "interrupted" (Ctrl-C / SIGINT; the checkpoint was saved)
    checkpoint: Path | None
    export_dir: Path | None
    loss: float | None  # mean loss of the last logging interval
    train_seconds: float  # wall-clock time of this invocation's optimizer steps
    steps_per_second: float


class TrainingLoop:
    """The shared loop (see the module docstring). ``resume``: a checkpoint folder, a run folder, or "latest"
    (the newest intact checkpoint in ``run.output_dir``); on resume the checkpoint's own config is used and only
    the ``run`` section's loop settings (steps, time budget, intervals, output) may change.
    ``on_step_end(trainer, step)`` is called after every optimizer step, after any checkpoint of that step."""

    CONFIG_KEYS: tuple[str, ...] = ("train",)  # config.json sections the subclass writes and reads back

    def __init__(
        self,
        config: Any,
        *,
        resume: str | os.PathLike | None = None,
        env: ddp.DistEnv | None = None,
        on_step_end: Callable[[Any, int], None] | None = None,
    ) -> None:
        config.validate()
        self.env = env or ddp.init_distributed(config.run.device)
        self.on_step_end = on_step_end
        state = find_resume_state(resume, config.run.output_dir) if resume is not None else None
        if state is not None:
            for key in self.CONFIG_KEYS:  # what the trainer itself writes; a hand-edited file may lack them
                if not isinstance(state.config.get(key), dict):
                    raise CheckpointError(f"{state.path}: config.json: {key} must be a JSON object")
            try:  # the saved config with this run's loop settings (checked together: they replace old ones)
                config = type(config).from_dict({**state.config["train"], "run": config.to_dict()["run"]})
            except ConfigError as e:
                raise CheckpointError(f"{state.path}: config.json: {e}") from None
        self.resume_state: TrainingState | None = state
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        if self.env.is_main:
            check_writable_folder(self.run_dir, f"run.output_dir {self.run_dir}")
        if state is not None and state.step >= config.run.max_steps:
            raise ConfigError(
                f"{state.path} is at step {state.step} and run.max_steps is {config.run.max_steps}: there is "
                f"nothing to train; to continue, pass a run.max_steps above {state.step}"
            )
        self.step = 0
        self.data_position = 0  # examples consumed from the data stream (all ranks together)
        self.train_seconds_total = 0.0
        self.log_window: list[float] = []  # losses of the steps since the last metrics record
        self.resumed_from: Path | None = None
        self.power_ema: PowerEMA | None = None  # the tracked averages of ema.kind 'power' (see _make_ema)

    def _init_training(self, model: torch.nn.Module) -> None:
        """Take ``model`` (already on the device, in training layout): its EMA copy, AdamW over the parameters
        that require grad, the autocast dtype and gradient scaler, seeds; then restore the resume state and wrap
        the model for DDP. Call once from the subclass's ``__init__`` after the model and data exist."""
        c, device = self.config, self.env.device
        self.model = model
        self.ema = self._make_ema()
        if c.ema.kind == "power" and self.power_ema is None:
            raise ConfigError(f"ema.kind 'power' is not available for {type(self).__name__}; allowed: 'classic'")
        o = c.optim
        self.optimizer = torch.optim.AdamW(
            self._parameter_groups(),
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
        )
        self.autocast_dtype = resolve_precision(c.run.mixed_precision, device)
        self.scaler = (
            torch.amp.GradScaler("cuda") if device.type == "cuda" and self.autocast_dtype == torch.float16 else None
        )
        seed_everything(c.run.seed, self.env.rank)
        if self.resume_state is not None:
            restore_state(self, self.resume_state)
        self.resume_state = None  # its tensors are in the model now
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if self.env.distributed
            else None
        )

    # ------------------------------------------------------------------------------------- subclass hooks
    def _accumulate(
        self, model: torch.nn.Module, batch: Any, micro: int, *, last: bool, amp: contextlib.AbstractContextManager
    ) -> Tensor:
        raise NotImplementedError

    def _write_samples(self, logger: MetricsLogger | None) -> Path | None:
        return None

    def _export(self) -> Path | None:
        return None

    def _header_lines(self) -> list[str]:
        return [f"diffusekit train: run folder {self.run_dir}"]

    def extra_metrics(self) -> dict[str, float]:
        """Numbers of the record's step that the subclass adds to each metrics record (e.g. the terms of a
        composite loss); none by default."""
        return {}

    def _make_ema(self) -> torch.nn.Module:
        """The EMA copy of ``self.model`` (a frozen copy of the weights); with ema.kind 'power' the first of the
        power-function averages, all of which ``self.power_ema`` tracks."""
        if self.config.ema.kind == "power":
            self.power_ema = PowerEMA(self.model, self.config.ema.sigma_rels)
            return self.power_ema.averages[0]
        return make_ema(self.model)

    def _ema_decay(self) -> float:
        """The decay of the EMA update after optimizer step ``self.step`` (a power EMA: its first profile's)."""
        if self.power_ema is not None:
            return power_beta(self.step, self.power_ema.gammas[0])
        return ema_decay(self.step, self.config.ema.decay, self.config.ema.warmup)

    def _update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * weights, after each optimizer step; a power EMA updates each of
        its averages with its own beta_t and saves them every ema.snapshot_every steps."""
        if self.power_ema is None:
            ema_update(self.ema, self.model, decay)
            return
        self.power_ema.update(self.model, self.step)
        if self.step % self.config.ema.snapshot_every == 0:
            self._save_ema_snapshot()

    def _save_ema_snapshot(self) -> None:
        """Rank 0 writes the power EMA's averages of this step to ``run_dir/ema_snapshots`` with the run config."""
        if self.env.is_main and self.power_ema is not None:
            self.power_ema.save_snapshot(self.run_dir / SNAPSHOT_DIR, self.step, config=self.checkpoint_config())

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: one holding the parameters that require grad. A subclass may return
        several, each with an ``lr_scale``: its rate is the scheduled rate times that (e.g. text-encoder
        adapters trained at their own rate)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def weights(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The (model, EMA) state dicts a checkpoint holds; a subclass that trains a few parameters of a big
        frozen model (adapters) returns only those. A power EMA's dict holds all of its averages."""
        ema = self.power_ema.checkpoint_dict() if self.power_ema is not None else self.ema.state_dict()
        return self.model.state_dict(), ema

    def load_weights(self, model: dict[str, Tensor], ema: dict[str, Tensor]) -> None:
        """Put ``weights()``'s dicts back (RuntimeError/KeyError when they do not fit)."""
        self.model.load_state_dict(model)
        if self.power_ema is not None:
            self.power_ema.load_checkpoint_dict(ema)
        else:
            self.ema.load_state_dict(ema)

    def checkpoint_config(self) -> dict[str, Any]:
        """The sections of a checkpoint's config.json (``train`` at least)."""
        return {"train": self.config.to_dict()}

    def _batch_sampler(self, num_items: int) -> StreamBatchSampler:
        """This rank's micro-batches of indices into ``num_items`` examples, continuing at ``self.data_position``."""
        c, env = self.config, self.env
        return StreamBatchSampler(num_items, c.optim.batch_size, c.run.seed, start=self.data_position, rank=env.rank,
                                  world_size=env.world_size)  # fmt: skip

    def _index_batches(self, num_items: int) -> Iterator[Tensor]:
        """``_batch_sampler``'s micro-batches as index tensors (B,), for examples held in memory (cached latents)."""
        return (torch.as_tensor(idx, dtype=torch.long) for idx in self._batch_sampler(num_items))

    def _batches(self) -> Iterator[Any]:
        """This rank's micro-batches from ``self.dataset``, continuing at ``self.data_position``."""
        c, env = self.config, self.env
        sampler = self._batch_sampler(len(self.dataset))
        workers = c.data.num_workers if c.data.num_workers is not None else min(4, os.cpu_count() or 1)
        return make_batches(self.dataset, sampler, num_workers=workers, pin_memory=env.device.type == "cuda")

    # ------------------------------------------------------------------------------------------- parts
    @property
    def global_batch(self) -> int:
        """Examples per micro-batch over all ranks."""
        return self.config.optim.batch_size * self.env.world_size

    def save_checkpoint(self) -> Path:
        """Write the current state (rank 0 writes; every rank returns the checkpoint's path), and a power EMA's
        snapshot of this step if its interval did not just write one."""
        path = self.run_dir / CHECKPOINTS_DIR / step_dir_name(self.step)
        if self.power_ema is not None and self.step % self.config.ema.snapshot_every != 0:
            self._save_ema_snapshot()
        if self.env.is_main:
            path = save_checkpoint(
                self.run_dir / CHECKPOINTS_DIR,
                self.step,
                keep=self.config.run.keep_checkpoints,
                **checkpoint_payload(self),
            )
        ddp.barrier(self.env)
        return path

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
        batches = self._batches()
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
            print("\n".join(self._header_lines()), file=sys.stderr, flush=True)
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
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=env.device)
                for a in range(accum):
                    loss_sum += self._accumulate(
                        model, next(batches), self.step * accum + a, last=a == accum - 1, amp=amp
                    )
                self.data_position += accum * self.global_batch
                mean_loss, grad_norm = self._optimizer_step(loss_sum / accum, last_ckpt)
                self.step += 1
                decay = self._ema_decay()
                self._update_ema(decay)
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
                        **self.extra_metrics(),
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
            export_dir = self._export()
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

    def _optimizer_step(self, loss: Tensor, last_ckpt: Path | None) -> tuple[float, float]:
        """Check the (all-reduced) loss, clip the gradient norm, step AdamW. Returns (loss, grad norm)."""
        mean_loss = float(ddp.all_reduce_mean(loss, self.env))
        if not math.isfinite(mean_loss):
            self._diverged("loss", mean_loss, last_ckpt)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip_norm if self.config.optim.grad_clip_norm is not None else math.inf
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
            self.scaler.update()
        else:
            if not math.isfinite(grad_norm):
                self._diverged("gradient norm", grad_norm, last_ckpt)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, grad_norm

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


def _mmss(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"
