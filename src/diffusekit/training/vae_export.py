"""From autoencoder training to the pipelines: the latent scaling factor measured on the data, and the VAE
folder in the reference (diffusers ``AutoencoderKL``) layout that every pipeline and ``io.models.load_vae``
read::

    config.json                            (the reference's keys; scaling_factor = the measured 1 / std)
    diffusion_pytorch_model.safetensors    (the EMA weights, float32)

Rombach et al. 2022 (sec. 4.3.2 and Appendix D.1) rescale the latents of a KL autoencoder so that they have
unit standard deviation before the diffusion model sees them: z <- z / std(z), with std(z) estimated on the
data. Here std is that of latents *sampled from the posterior* q(z|x) (mean + std * eps, as the diffusion
model is later trained on, and as the LDM implementation's ``scale_by_std`` measures it), over all elements of
the latents of a fixed subset of the training data: ``scaling_examples`` images drawn by a seeded permutation,
encoded with a seeded noise generator, so the factor is reproducible.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import folder_atomic
from diffusekit.io.models import save_vae
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.training.batches import epoch_permutation
from diffusekit.training.data import TrainDataset

SCALING_SEED = 0x5CA1E  # the subset and the posterior noise of the measurement; fixed, not the run's seed
MEASURE_BATCH = 64


def scaling_subset(num_items: int, examples: int) -> list[int]:
    """The dataset indices the scaling factor is measured on: the first ``examples`` of a fixed permutation
    (every class of a class-sorted folder is represented), all of them when the dataset is smaller."""
    return [int(i) for i in epoch_permutation(num_items, SCALING_SEED, 0)[:examples]]


@torch.no_grad()
def latent_std(
    vae: AutoencoderKL,
    dataset: TrainDataset,
    *,
    examples: int,
    device: torch.device | str = "cpu",
    batch_size: int = MEASURE_BATCH,
) -> float:
    """The standard deviation of all elements of posterior samples z ~ q(z|x) over ``scaling_subset``;
    the encoder runs in float32 on ``device``."""
    was_training = vae.training
    vae.eval()
    indices = scaling_subset(len(dataset), examples)
    generator = torch.Generator().manual_seed(SCALING_SEED)
    latents = []
    for start in range(0, len(indices), batch_size):
        x, _ = dataset.batch(indices[start : start + batch_size])  # (B, C, H, W) in [-1, 1]
        posterior = vae.encode(x.to(device, torch.float32))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents.append(posterior.sample(noise).double().cpu())  # (B, latent, h, w)
    vae.train(was_training)
    return float(torch.cat(latents).std())


def scaling_factor_from_std(std: float) -> float:
    """1 / std (Rombach et al. 2022, sec. 4.3.2); a ConfigError when the latents are (numerically) constant,
    where no factor can give them unit variance."""
    if not math.isfinite(std) or std < 1e-12:
        raise ConfigError(
            f"the latents' standard deviation is {std!r}: the autoencoder maps the data to a constant, so no "
            "scaling factor can give the latents unit variance; train longer or check the data"
        )
    return 1.0 / std


def export_vae(ema_model: AutoencoderKL, folder: str | os.PathLike, scaling_factor: float) -> Path:
    """Write ``ema_model`` (a float32 CPU copy) with ``scaling_factor`` in its config as a reference VAE
    folder; the folder is replaced atomically."""
    folder = Path(folder)
    vae = AutoencoderKL(replace(ema_model.config, scaling_factor=scaling_factor))
    vae.load_state_dict({k: v.detach().float().cpu() for k, v in ema_model.state_dict().items()})
    with folder_atomic(folder, what="VAE folder") as tmp:
        save_vae(vae.eval(), tmp)
    return folder
