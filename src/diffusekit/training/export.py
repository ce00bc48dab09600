"""From training to sampling: the inference folder export, and pipelines built from training checkpoints.

The export is the reference's DDPMPipeline layout, which ``diffusekit.pipelines.unconditional.load_pipeline``
(and the reference implementation) read::

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model.safetensors   (the EMA weights)
    scheduler/scheduler_config.json                               (DDPMScheduler keys)

A class-conditional network has ``num_classes + 1`` class embeddings; the last id is "no class".
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.atomic import folder_atomic
from diffusekit.io.weights import read_json
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.pipelines.super_resolution import TASK, SuperResolutionPipeline, save_sr_pipeline
from diffusekit.pipelines.unconditional import UnconditionalPipeline, load_pipeline, save_pipeline
from diffusekit.samplers.config import SamplerConfig
from diffusekit.training.checkpoint import load_checkpoint, resolve_checkpoint
from diffusekit.training.config import DiffusionConfig, TaskConfig, TrainConfig
from diffusekit.training.power_ema import first_average

EXPORT_DIR = "model"
_SR_MODEL = "{path} is a super-resolution model, which upscales images: run 'diffusekit upscale --model {path} IMAGE'"


def sampler_config(diffusion: DiffusionConfig, sampler: str | None = None) -> SamplerConfig:
    """The sampling schedule matching a training run: same betas and parametrization (or the same EDM
    preconditioning and sigma range), x0 clipped to [-1, 1] (pixel data) with eps re-derived from the clipped
    x0 (``clip_eps``: see ``samplers.common.Denoiser``), ``trailing`` timestep spacing (Lin et al. 2024,
    sec. 3.3: every grid starts at the last training timestep). ``sampler`` None: DDPM, or for the EDM
    preconditioning Heun (Karras et al. 2022, Alg. 1), which an exported folder then names."""
    edm = diffusion.preconditioning == "edm"
    return SamplerConfig(
        sampler=sampler or ("heun" if edm else "ddpm"),
        preconditioning=diffusion.preconditioning,
        sigma_data=diffusion.sigma_data,
        sigma_min=diffusion.sigma_min,
        sigma_max=diffusion.sigma_max,
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_schedule=diffusion.beta_schedule,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        zero_terminal_snr=diffusion.zero_terminal_snr,
        prediction_type=diffusion.prediction_type,
        timestep_spacing="trailing",
        steps_offset=0,
        clip_sample=1.0,
        clip_eps=True,
        variance="fixed_small",
    )


def export_inference(
    ema_model: UNet, diffusion: DiffusionConfig, folder: str | os.PathLike, *, task: TaskConfig | None = None
) -> Path:
    """Write ``ema_model`` (float32, CPU copy) and its scheduler as an inference folder; atomic replace. A
    super-resolution ``task`` writes the super-resolution layout, which records the task, its scale, its
    downsampling and its conditioning noise levels (``pipelines.super_resolution.save_sr_pipeline``)."""
    folder = Path(folder)
    net = UNet(ema_model.config)
    net.load_state_dict({k: v.detach().float().cpu() for k, v in ema_model.state_dict().items()})
    with folder_atomic(folder, what="inference folder") as tmp:
        if task is not None and task.kind == TASK:
            save_sr_pipeline(SuperResolutionPipeline(net.eval(), sampler_config(diffusion), scale=task.scale,
                                                     max_noise_level=task.max_noise_level,
                                                     downsample=task.downsample), tmp)  # fmt: skip
        else:
            save_pipeline(UnconditionalPipeline(net.eval(), sampler_config(diffusion)), tmp)
    return folder


def load_for_sampling(
    path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu"
) -> UnconditionalPipeline:
    """A sampling pipeline from an inference folder, a training checkpoint, or a run folder.

    A run folder uses its exported ``model/`` when present (unless ``use_ema`` is False), else its newest
    intact checkpoint. Checkpoints give the EMA weights by default, the raw weights with ``use_ema=False``.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model not found: {path}")
    for folder in (path, path / EXPORT_DIR) if use_ema else (path,):
        if (folder / "model_index.json").is_file():
            if read_json(folder / "model_index.json").get("task") == TASK:
                raise ConfigError(_SR_MODEL.format(path=path))
            return load_pipeline(folder, device=device)
    try:
        ckpt = load_checkpoint(resolve_checkpoint(path))
    except CheckpointError as e:
        raise ConfigError(
            f"{path} is neither an inference folder (model_index.json) nor a training run/checkpoint: {e}"
        ) from None
    train = TrainConfig.from_dict(ckpt.config["train"])
    if train.task.kind == TASK:
        raise ConfigError(_SR_MODEL.format(path=path))
    net = UNet(UNetConfig.from_dict(ckpt.config["unet"]))
    net.load_state_dict(first_average(ckpt.ema) if use_ema else ckpt.model)  # a power EMA's first average
    return UnconditionalPipeline(net.to(device).eval(), sampler_config(train.diffusion))
