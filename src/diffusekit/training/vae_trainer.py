"""Training the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and Appendix G)
on the shared loop (``diffusekit.training.loop``): EMA, exact resume, DDP, mixed precision, TensorBoard.

Each micro-batch: images x in [-1, 1] (flipped horizontally where ``data.random_flip`` says), the posterior
q(z|x) = N(mu, sigma^2) from the encoder, z = mu + sigma * eps (the reparameterisation of Kingma & Welling
2014, eq. 10) or z = mu, x_hat = D(z), and the loss of ``diffusekit.training.vae_losses`` (per-pixel L1 or L2
plus ``kl_weight`` times the summed KL); with ``loss.adversarial`` also the PatchGAN terms of
``diffusekit.training.vae_adversarial``. eps and the flips are drawn for the whole global batch from the
(seed, micro-batch) generator and sliced per rank, so a resumed run continues bit for bit and N processes
train as one would.

The adversarial variant trains the autoencoder and the discriminator simultaneously from one backward pass:
the generator term sees the discriminator's weights detached (it moves only the autoencoder) and the
discriminator's hinge loss sees the images detached (it moves only the discriminator); one AdamW step then
updates both. (The reference implementation alternates two optimizers on each batch instead.) The adaptive
weight is computed by each process from its own slice of the batch, so with DDP the adversarial variant
matches a single process only approximately; without it, N processes compute the gradient one would.

At the end the EMA autoencoder is exported as a reference VAE folder (``run_dir/vae``) with its latent
scaling factor measured on the training data (``diffusekit.training.vae_export``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.images import make_grid, save_image_grid
from diffusekit.networks.vae import AutoencoderKL, VAEConfig
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.training import distributed as ddp
from diffusekit.training.data import TrainDataset, dataset_from_config, from_model_range, random_flip_of
from diffusekit.training.loop import SAMPLES_DIR, TrainingLoop
from diffusekit.training.memory import check_memory, forward_activation_bytes
from diffusekit.training.monitor import MetricsLogger
from diffusekit.training.randomness import micro_batch_generator
from diffusekit.training.vae_adversarial import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_hinge_loss,
    generator_loss,
    patch_map_size,
)
from diffusekit.training.vae_export import export_vae, latent_std, scaling_factor_from_std, scaling_subset
from diffusekit.training.vae_losses import vae_loss
from diffusekit.training.vae_presets import build_vae_config
from diffusekit.training.vae_train_config import VAETrainConfig

VAE_EXPORT_DIR = "vae"
# loss terms of AutoencoderTraining.forward -> their names in metrics.jsonl
METRIC_NAMES = {"rec": "rec_loss", "kl": "kl", "gan": "gan_loss", "disc": "disc_loss", "adaptive": "adaptive_weight"}


class AutoencoderTraining(nn.Module):
    """The autoencoder and, for the adversarial variant, its discriminator: one module, so that the loop's
    optimizer, EMA, checkpoints and DDP cover both. ``forward`` returns the losses of one micro-batch."""

    def __init__(self, vae: AutoencoderKL, discriminator: PatchDiscriminator | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.discriminator = discriminator

    def forward(
        self,
        x: Tensor,
        noise: Tensor | None,
        *,
        reconstruction: str,
        kl_weight: float,
        adversarial_weight: float = 0.0,
    ) -> dict[str, Tensor]:
        """x (B, C, H, W) in [-1, 1]; ``noise`` (B, latent, h, w) for z = mu + sigma * noise, None for z = mu.
        ``adversarial_weight`` 0 leaves the adversarial terms at weight zero (before their start step).
        Returns ``total`` (what is minimised), ``loss`` (the autoencoder's L_rec + L_reg, logged), ``rec``,
        ``kl`` and, with a discriminator, ``gan``, ``disc`` and ``adaptive``."""
        posterior = self.vae.encode(x)
        z = posterior.mean if noise is None else posterior.sample(noise)  # (B, latent, h, w)
        x_hat = self.vae.decode(z)  # (B, C, H, W)
        loss, rec, kl = vae_loss(x_hat, x, posterior, kind=reconstruction, kl_weight=kl_weight)
        out = {"total": loss, "loss": loss, "rec": rec, "kl": kl}
        d = self.discriminator
        if d is None:
            return out
        # generator term: the discriminator's weights detached, so it moves the autoencoder only
        frozen = {k: v.detach() for k, v in (*d.named_parameters(), *d.named_buffers())}
        gan = generator_loss(functional_call(d, frozen, (x_hat,)))
        if adversarial_weight > 0 and torch.is_grad_enabled():
            weight = adversarial_weight * adaptive_weight(rec, gan, self.vae.decoder.conv_out.weight)
        else:
            weight = torch.zeros((), device=x.device)
        # discriminator term (hinge): the images detached, so it moves the discriminator only
        disc = discriminator_hinge_loss(d(x.detach()), d(x_hat.detach()))
        on = 1.0 if adversarial_weight > 0 else 0.0  # kept in the graph at 0 so DDP sees every parameter used
        out.update(total=loss + weight * gan + on * disc, gan=gan, disc=disc, adaptive=weight)
        return out


class VAETrainer(TrainingLoop):
    """Trains an :class:`AutoencoderKL` as a :class:`VAETrainConfig` says; ``fit()`` runs to the end of the
    budget and exports the EMA weights with their measured scaling factor to ``run_dir/vae``.

    ``resume``, ``env``, ``on_step_end``: as for ``TrainingLoop``. ``dataset`` overrides ``config.data``
    (e.g. an in-memory ``ArrayDataset``).
    """

    CONFIG_KEYS = ("train", "vae")

    def __init__(
        self,
        config: VAETrainConfig,
        *,
        resume: str | os.PathLike | None = None,
        dataset: TrainDataset | None = None,
        env: ddp.DistEnv | None = None,
        on_step_end: Callable[[Any, int], None] | None = None,
    ) -> None:
        super().__init__(config, resume=resume, env=env, on_step_end=on_step_end)
        c, state = self.config, self.resume_state
        self.dataset = dataset or dataset_from_config(c.data)
        ds = self.dataset
        self.random_flip = random_flip_of(c.data)
        torch.manual_seed(c.run.seed)  # identical initial weights on every rank
        if state is not None:
            try:
                self.vae_config = VAEConfig.from_dict(state.config["vae"])
            except ConfigError as e:
                raise CheckpointError(f"{state.path}: config.json: vae: {e}") from None
            if (self.vae_config.in_channels, self.vae_config.sample_size) != (ds.channels, ds.resolution):
                raise ConfigError(
                    f"the checkpoint's autoencoder takes {self.vae_config.in_channels}-channel "
                    f"{self.vae_config.sample_size}px images, the data has {ds.channels}-channel {ds.resolution}px"
                )
        else:
            v = c.vae
            self.vae_config = build_vae_config(v.preset, v.overrides, channels=ds.channels, resolution=ds.resolution,
                                               latent_channels=v.latent_channels,
                                               downsample_factor=v.downsample_factor)  # fmt: skip
        lc = c.loss
        if lc.adversarial and patch_map_size(ds.resolution, lc.discriminator_layers) < 1:
            fits = max(k for k in range(1, 7) if patch_map_size(ds.resolution, k) >= 1) if ds.resolution >= 6 else 0
            raise ConfigError(
                f"loss.discriminator_layers={lc.discriminator_layers} needs images of at least "
                f"{3 * 2**lc.discriminator_layers}px, the data has {ds.resolution}px; "
                + (f"use loss.discriminator_layers={fits} or fewer" if fits else "turn loss.adversarial off")
            )
        device = self.env.device
        self._check_memory(lc.adversarial)
        vae = AutoencoderKL(self.vae_config)  # drawn first: the same initial autoencoder with or without a critic
        disc = (
            PatchDiscriminator(ds.channels, channels=lc.discriminator_channels, layers=lc.discriminator_layers)
            if lc.adversarial
            else None
        )
        plan = Plan(dtype=torch.float32, channels_last=device.type == "cpu", inference=False)
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        self._init_training(prepare(AutoencoderTraining(vae, disc), plan, device=device))
        self.last_scaling: tuple[float, float] | None = None  # (latent std, scaling factor) of the export
        self._terms: dict[str, Tensor] = {}  # the last optimizer step's loss terms (extra_metrics)

    def _check_memory(self, adversarial: bool) -> None:
        """Refuse a micro-batch whose estimated memory (a meta-device forward, ``training.memory``) exceeds
        the device's, naming optim.batch_size and data.resolution, before the model is allocated."""
        c, v, res = self.config, self.vae_config, self.dataset.resolution
        lc = c.loss
        with torch.device("meta"):
            disc = PatchDiscriminator(v.in_channels, channels=lc.discriminator_channels,
                                      layers=lc.discriminator_layers) if adversarial else None  # fmt: skip
            net = AutoencoderTraining(AutoencoderKL(v), disc)

        def forward(net: nn.Module) -> None:
            x = torch.empty(1, v.in_channels, res, res, device="meta")  # (1, C, R, R)
            noise = torch.empty(1, v.latent_channels, res // v.downsample_factor, res // v.downsample_factor,
                                device="meta")  # fmt: skip
            net(x, noise, reconstruction=lc.reconstruction, kl_weight=lc.kl_weight)

        per_example = forward_activation_bytes(net, forward)
        n_params = sum(p.numel() for p in net.parameters())
        check_memory(per_example, n_params, resolution=res, batch_size=c.optim.batch_size, device=self.env.device)

    # ------------------------------------------------------------------------------------------- hooks
    def checkpoint_config(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "train": self.config.to_dict(),
            "vae": self.vae_config.to_dict(),
            "dataset": {"size": len(ds), "channels": ds.channels, "resolution": ds.resolution},
        }

    def _accumulate(
        self,
        model: nn.Module,
        batch: tuple[Tensor, Tensor | None],
        micro: int,
        *,
        last: bool,
        amp: contextlib.AbstractContextManager,
    ) -> Tensor:
        """Forward and backward of this rank's slice of global micro-batch ``micro``; gradients accumulate
        (DDP synchronises them on the ``last`` micro-batch). Returns the autoencoder loss (detached)."""
        c, env = self.config, self.env
        B, G = c.optim.batch_size, self.global_batch
        x, _ = batch
        f, n = self.vae_config.downsample_factor, self.vae_config.latent_channels
        h, w = x.shape[2] // f, x.shape[3] // f
        gen = micro_batch_generator(c.run.seed, micro)
        noise = torch.randn((G, n, h, w), generator=gen)[env.rank * B : (env.rank + 1) * B]  # drawn first
        flip = (torch.rand(G, generator=gen) < 0.5)[env.rank * B : (env.rank + 1) * B]
        x = x.to(env.device, non_blocking=True)  # (B, C, H, W)
        if self.random_flip:
            x = torch.where(flip.to(env.device)[:, None, None, None], x.flip(-1), x)
        x = x.contiguous(memory_format=self.memory_format)
        lc = c.loss
        started = lc.adversarial and self.step >= lc.adversarial_start
        sync = self.ddp_model is None or last
        with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
            with amp:
                out = model(
                    x,
                    noise.to(env.device) if lc.sample_posterior else None,
                    reconstruction=lc.reconstruction,
                    kl_weight=lc.kl_weight,
                    adversarial_weight=lc.adversarial_weight if started else 0.0,
                )
            scaled = out["total"] / c.optim.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        accum = c.optim.grad_accum_steps
        if micro % accum == 0:
            self._terms = {}
        for key, name in METRIC_NAMES.items():
            if key in out:
                self._terms[name] = self._terms.get(name, 0.0) + out[key].detach() / accum
        return out["loss"].detach()

    def extra_metrics(self) -> dict[str, float]:
        """The loss terms of the last optimizer step on this process (its micro-batches' mean), for the
        metrics record: ``rec_loss``, ``kl`` (summed over the latent, per image) and, adversarial,
        ``gan_loss``, ``disc_loss``, ``adaptive_weight``."""
        return {name: float(v) for name, v in self._terms.items()}

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, use_ema: bool = True) -> Tensor:
        """Reconstructions decode(mean of q(z|x)) of images ``x`` in [-1, 1] by the EMA (or raw) weights."""
        vae = (self.ema if use_ema else self.model).vae
        was_training = vae.training
        vae.eval()
        x_hat = vae.decode(vae.encode(x.to(self.env.device, torch.float32)).mean)
        vae.train(was_training)
        return x_hat

    def preview_images(self, n: int) -> Tensor:
        """A fixed set of ``n`` training images (the first of the scaling subset), (n, C, R, R) in [-1, 1]."""
        x, _ = self.dataset.batch(scaling_subset(len(self.dataset), n))
        return x

    def _write_samples(self, logger: MetricsLogger | None) -> Path:
        """originals | EMA reconstructions, side by side, to ``samples/step-N.png`` and TensorBoard."""
        x = self.preview_images(self.config.run.num_sample_images)
        x_hat = self.reconstruct(x).cpu()
        k = math.ceil(math.sqrt(len(x)))
        left, right = make_grid(from_model_range(x), nrow=k), make_grid(from_model_range(x_hat), nrow=k)
        grid = torch.cat([left, torch.ones_like(left[:, :, :4]), right], dim=2)  # (C, H', 2 W' + 4)
        path = save_image_grid(grid[None], self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png", padding=0,
                               scale=2)  # fmt: skip
        if logger is not None:
            logger.log_images("reconstructions/originals_vs_ema", grid, self.step)
        return path

    def _export(self) -> Path:
        """The EMA autoencoder as a reference VAE folder, its scaling factor 1 / std of posterior samples
        over ``vae.scaling_examples`` training images."""
        vae = self.ema.vae
        c = self.config
        # encoded in training-sized batches: a batch that fits a training step fits an encoder pass
        std = latent_std(vae, self.dataset, examples=c.vae.scaling_examples, device=self.env.device,
                         batch_size=c.optim.batch_size)  # fmt: skip
        factor = scaling_factor_from_std(std)
        self.last_scaling = (std, factor)
        return export_vae(vae, self.run_dir / VAE_EXPORT_DIR, factor)

    def _header_lines(self) -> list[str]:
        c, ds, v = self.config, self.dataset, self.vae_config
        n_params = sum(p.numel() for p in self.model.vae.parameters())
        f = v.downsample_factor
        latent = f"{v.latent_channels}x{ds.resolution // f}x{ds.resolution // f}"
        prec = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaling"}
        loss = f"{c.loss.reconstruction.upper()} + {c.loss.kl_weight:g} x KL"
        if c.loss.adversarial:
            loss += f" + adversarial (PatchGAN hinge, from step {c.loss.adversarial_start})"
        return [
            f"diffusekit train-vae: {len(ds)} images {ds.channels}x{ds.resolution}x{ds.resolution} from "
            f"{c.data.source!r}",
            f"  model: {c.vae.preset} autoencoder, f={f}, latents {latent}, {n_params / 1e6:.2f}M parameters; "
            f"loss {loss}",
            f"  batch: {c.optim.batch_size} x {c.optim.grad_accum_steps} accumulation x {self.env.world_size} "
            f"process(es) = {c.optim.batch_size * c.optim.grad_accum_steps * self.env.world_size} per step; "
            f"device {self.env.device}, {prec[self.autocast_dtype]}",
            f"  run folder: {self.run_dir}" + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
        ]
