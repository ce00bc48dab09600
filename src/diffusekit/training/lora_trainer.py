"""LoRA fine-tuning of a Stable Diffusion (SD-1.x/2.x or SDXL) pipeline on a captioned image folder, on the
shared :class:`~diffusekit.training.loop.TrainingLoop`.

One micro-batch (latent diffusion, Rombach et al. 2022, eq. 2, with DDPM's Algorithm 1 on the latents): take
cached posteriors of the batch's images and draw z = mean + std n; draw t ~ U{0..T-1} and eps ~ N(0, I) on the
pipeline's own training schedule, form z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps (DDPM eq. 4), condition on
the captions through the pipeline's text encoder(s) (SDXL: both, the pooled projection and the images'
micro-conditioning), and regress the U-Net's output on the target of the scheduler's ``prediction_type``
(eps or v, Salimans & Ho 2022), optionally Min-SNR-gamma weighted. Only the adapters train
(:mod:`diffusekit.training.lora_adapters`).

All randomness of a micro-batch (t, eps, the posterior draw, flips, caption dropout) comes from the
(seed, micro-batch) generator, drawn for the global batch and sliced per rank: a resumed run continues bit for
bit, and N processes compute what one would. A checkpoint holds the adapters, their EMA and the optimizer, never
the base model. The end of the run writes the adapters as a LoRA file (kohya or PEFT layout).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit import __version__
from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.lora import save_lora
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.sdxl import StableDiffusionXL
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.upscale import StableDiffusionUpscaler
from diffusekit.training import distributed as ddp
from diffusekit.training.ema import ema_update, make_ema
from diffusekit.training.loop import TrainingLoop
from diffusekit.training.lora_adapters import LoraNetwork, plan_targets
from diffusekit.training.lora_config import LoraTrainConfig
from diffusekit.training.lora_data import CaptionedLatents, prepare_data
from diffusekit.training.losses import noisy_inputs, timestep_weights, weighted_mse
from diffusekit.training.monitor import MetricsLogger
from diffusekit.training.randomness import BatchRandomness, micro_batch_generator

SAMPLES_DIR = "samples"


def check_output(path: str | os.PathLike, overwrite: bool, option: str = "lora.output") -> Path:
    """``path`` if a LoRA file may be written there: a ``.safetensors`` name, not a folder, not an existing file
    unless ``overwrite``; ConfigError naming ``option`` otherwise."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{option} {path}: a LoRA file name must end in .safetensors")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; name the .safetensors file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"{option} {path}: the file exists; pass --overwrite to replace it, or choose another name")
    return path


class LoraTrainer(TrainingLoop):
    """Trains LoRA adapters on ``config.lora.model`` (see the module docstring). ``sd``: an already loaded
    pipeline to adapt (default: load ``config.lora.model`` in float32); its networks are frozen and get the
    adapters (taken off again by :meth:`close`). ``output`` / ``overwrite``: where the LoRA file goes at the end
    (default ``config.lora.output``; on resume the checkpoint's config is used, so a new name is given here)."""

    CONFIG_KEYS = ("train",)

    def __init__(
        self,
        config: LoraTrainConfig,
        *,
        resume: str | os.PathLike | None = None,
        sd: StableDiffusion | None = None,
        output: str | os.PathLike | None = None,
        overwrite: bool = False,
        env: ddp.DistEnv | None = None,
        on_step_end: Callable[[Any, int], None] | None = None,
    ) -> None:
        super().__init__(config, resume=resume, env=env, on_step_end=on_step_end)
        c = self.config
        self.output = check_output(output if output is not None else c.lora.output, overwrite)
        self.overwrite = overwrite
        device = self.env.device
        if sd is None:
            sd = load_pipeline(c.lora.model, tokenizer=c.lora.tokenizer, device=device, dtype=torch.float32,
                               fast=False)  # fmt: skip
        if not isinstance(sd, StableDiffusion) or isinstance(sd, StableDiffusionUpscaler):
            raise ConfigError(f"lora.model {c.lora.model}: LoRA fine-tuning takes an SD-1.x/2.x or SDXL "
                              f"text-to-image model, not a {type(sd).__name__}")  # fmt: skip
        if sd.sampler_config.preconditioning != "none":
            raise ConfigError(f"lora.model {c.lora.model}: its scheduler uses EDM preconditioning, which LoRA "
                              "fine-tuning does not train")  # fmt: skip
        if sd.unet.config.in_channels != sd.codec.channels:
            raise ConfigError(f"lora.model {c.lora.model}: an inpainting U-Net ({sd.unet.config.in_channels} input "
                              "channels) is not fine-tuned by train-lora")  # fmt: skip
        self.sd = sd
        self.schedule = sd.sampler_config.schedule()
        self.prediction_type = sd.sampler_config.prediction_type
        if self.env.is_main:  # rank 0 encodes (or reuses) the cache, the others read it
            self.data = self._prepare(build=True)
        ddp.barrier(self.env)
        if not self.env.is_main:
            self.data = self._prepare(build=False)
        self.dataset = self.data  # the loop's batch stream counts its examples
        self.latent_shape = self.data.cache.latent_shape
        plan = plan_targets(sd, c.lora.targets, c.lora.train_text_encoder)
        model = LoraNetwork(sd, plan, rank=c.lora.rank, alpha=c.lora.scale_alpha, seed=c.run.seed)
        self.num_adapted = sum(len(m) for m in plan.values())
        if c.lora.gradient_checkpointing:
            sd.unet.set_gradient_checkpointing(True)
        self._init_training(model.to(device))

    def _prepare(self, *, build: bool) -> CaptionedLatents:
        c = self.config
        return prepare_data(self.sd, c.data, model_path=c.lora.model, run_dir=self.run_dir, build=build,
                            device=self.env.device, progress=c.run.progress and self.env.is_main)  # fmt: skip

    # ------------------------------------------------------------------------------------- loop hooks
    def _make_ema(self) -> torch.nn.Module:
        """The EMA holds the adapters only (the base model is frozen)."""
        return make_ema(self.model.adapters)

    def _update_ema(self, decay: float) -> None:
        ema_update(self.ema, self.model.adapters, decay)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The U-Net's adapters at ``optim.lr``; the text encoders' at ``lora.text_encoder_lr`` (as a factor of
        the scheduled rate) when it is given."""
        c = self.config
        groups = []
        for component, params in self.model.parameter_groups():
            te_lr = c.lora.text_encoder_lr
            scale = te_lr / c.optim.lr if component != "unet" and te_lr is not None and c.optim.lr > 0 else 1.0
            groups.append({"params": params, "lr_scale": scale})
        return groups

    def _batches(self) -> Iterator[Tensor]:
        """This rank's image indices (B,) of each micro-batch, continuing at ``self.data_position`` (the
        latents are in memory: no loader processes)."""
        return self._index_batches(len(self.data))

    def _accumulate(
        self, model: torch.nn.Module, batch: Tensor, micro: int, *, last: bool, amp: contextlib.AbstractContextManager
    ) -> Tensor:
        """Forward and backward of this rank's slice of global micro-batch ``micro`` (module docstring)."""
        c, env = self.config, self.env
        B = c.optim.batch_size
        generator = micro_batch_generator(c.run.seed, micro)
        rnd = BatchRandomness.draw(generator, self.global_batch, self.latent_shape, self.schedule.num_train_timesteps,
                                   c.lora.caption_dropout)  # fmt: skip
        posterior_noise = torch.randn((self.global_batch, *self.latent_shape), generator=generator)
        rows = slice(env.rank * B, (env.rank + 1) * B)
        rnd, posterior_noise = rnd.slice(rows.start, rows.stop), posterior_noise[rows]
        flips = rnd.flip if c.data.random_flip else None
        z0 = self.data.cache.latents(batch, flipped=flips, noise=posterior_noise).to(env.device)  # (B, C, h, w)
        prompts = ["" if drop else self.data.captions[i] for i, drop in zip(batch.tolist(), rnd.drop_label.tolist())]
        time_ids = self.data.time_ids[batch].to(env.device) if self.data.time_ids is not None else None
        t = rnd.t.to(env.device)
        z_t, target = noisy_inputs(self.schedule, z0, rnd.noise.to(env.device), t, self.prediction_type)
        weights = timestep_weights(self.schedule, t, self.prediction_type, c.lora.min_snr_gamma)
        sync = self.ddp_model is None or last
        with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
            with amp:
                out = model(z_t, t, prompts, time_ids)
            loss = weighted_mse(out, target, weights)
            scaled = loss / c.optim.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def checkpoint_config(self) -> dict[str, Any]:
        d = self.data
        dataset = {"size": len(d), "resolution": d.resolution, "captions_from_files": d.captions_from_files}
        return {"train": self.config.to_dict(), "dataset": dataset}

    def _export(self) -> Path:
        """Write the adapters (their EMA, which equals them when ``ema.decay`` is 0) as the LoRA file."""
        path = save_lora_file(self.model.updates(self.ema), self.output, format=self.config.lora.format,
                              metadata=self.file_metadata(), overwrite=self.overwrite)  # fmt: skip
        return path

    def file_metadata(self) -> dict[str, str]:
        """The LoRA file's header: kohya's ``ss_*`` training fields (what other tools show) and ours."""
        c, d = self.config, self.data
        base = "sdxl_base_v1-0" if isinstance(self.sd, StableDiffusionXL) else "sd_v1"
        return {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(c.lora.rank),
            "ss_network_alpha": repr(c.lora.scale_alpha),
            "ss_base_model_version": base,
            "ss_sd_model_name": Path(c.lora.model).name,
            "ss_resolution": f"({d.resolution}, {d.resolution})",
            "ss_num_train_images": str(len(d)),
            "ss_steps": str(self.step),
            "ss_learning_rate": repr(c.optim.lr),
            "ss_text_encoder_lr": repr(c.lora.text_encoder_lr if c.lora.text_encoder_lr is not None else c.optim.lr)
            if c.lora.train_text_encoder else "0",  # fmt: skip
            "ss_training_comment": f"diffusekit {__version__} train-lora ({c.lora.targets} targets)",
        }

    @torch.no_grad()
    def _write_samples(self, logger: MetricsLogger | None) -> Path:
        """A grid of images for the first captions with the adapters as they are now (the sampler of the
        model's scheduler, ``run.sample_steps`` steps, guidance 7.5 for SD-1/2 and 5 for SDXL)."""
        from diffusekit.io.images import make_grid, save_image_grid
        from diffusekit.pipelines.sdxl import TextToImageXL
        from diffusekit.pipelines.text_to_image import TextToImage

        c, d = self.config, self.data
        n = min(c.run.num_sample_images, 16)
        prompts = [d.captions[i % len(d)] for i in range(n)]
        xl = isinstance(self.sd, StableDiffusionXL)
        pipe = TextToImageXL(self.sd) if xl else TextToImage(self.sd)
        generator = torch.Generator().manual_seed(c.run.seed)
        images = pipe(prompts, height=d.resolution, width=d.resolution, steps=c.run.sample_steps,
                      guidance_scale=5.0 if xl else 7.5, generator=generator, show_progress=False).images  # fmt: skip
        path = save_image_grid(images, self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png", scale=1)
        if logger is not None:
            logger.log_images("samples/lora", make_grid(images), self.step)
        return path

    def _header_lines(self) -> list[str]:
        c, d = self.config, self.data
        trainable = sum(p.numel() for p in self.model.parameters())
        prec = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaling"}
        parts = "U-Net" + (" + text encoder(s)" if c.lora.train_text_encoder else "")
        return [
            f"diffusekit train-lora: {len(d)} images at {d.resolution}px from {c.data.source!r} "
            f"({d.captions_from_files} captions from files)",
            f"  model: {c.lora.model} ({type(self.sd).__name__}, {self.prediction_type} target)",
            f"  adapters: rank {c.lora.rank}, alpha {c.lora.scale_alpha:g} on {self.num_adapted} {parts} layers "
            f"({c.lora.targets}), {trainable / 1e6:.3f}M trainable parameters"
            + (", gradient checkpointing" if c.lora.gradient_checkpointing else ""),
            f"  batch: {c.optim.batch_size} x {c.optim.grad_accum_steps} accumulation x {self.env.world_size} "
            f"process(es); device {self.env.device}, {prec[self.autocast_dtype]}",
            f"  run folder: {self.run_dir}" + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
            f"  output: {self.output} ({c.lora.format} layout)",
        ]

    def close(self) -> None:
        """Take the adapters off the pipeline (it is the base model again) and turn checkpointing off."""
        self.model.detach_adapters()
        self.sd.unet.set_gradient_checkpointing(False)


def save_lora_file(updates: dict, path: Path, *, format: str, metadata: dict[str, str], overwrite: bool) -> Path:
    """Write the trained updates; a failed write (a full disk, a name taken since the run started, which is kept)
    is a WeightsError that says the adapters are in the run's last checkpoint."""
    try:
        save_lora(updates, path, format=format, metadata=metadata, overwrite=overwrite)
    except WeightsError as e:
        raise WeightsError(f"{e}; the trained adapters are in the run's last checkpoint") from None
    return path


__all__ = ["LoraTrainer", "check_output"]
