"""Latent diffusion training (Rombach et al. 2022, sec. 3-4): the usual DDPM objective (Ho et al. 2020,
Algorithm 1) on z = scaling_factor * E(x) of a frozen VAE instead of on pixels, conditioned on class labels
or on captions through a CLIP text encoder and cross-attention (sec. 3.3).

Each micro-batch: indices from the data stream; their latents from the cache (:mod:`diffusekit.training
.latent_cache`), the flipped image's where the batch's flip says so, and a fresh posterior sample z = mean +
std * n (``latent.posterior = "sample"``, as SD trains) or the posterior mean; then t, eps, x_t and the loss
exactly as the pixel trainer (``training.losses``). Label dropout for classifier-free guidance (Ho & Salimans
2022) replaces a class label by the "no class" id, or a caption by the empty prompt. All of it is drawn from
the micro-batch's generator (``training.randomness``), so resume is exact and N processes match one.

The trained module is a :class:`LatentModel`: the U-Net and, when it is trained from scratch, the text encoder
(both get an EMA and are checkpointed together). A pretrained ``latent.text_encoder`` stays frozen outside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.models import load_vae
from diffusekit.io.text import load_text_encoder, load_tokenizer
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.training import distributed as ddp
from diffusekit.training.captions import keep_images, read_captions
from diffusekit.training.data import ImageFolderDataset, TrainDataset, dataset_from_config, random_flip_of
from diffusekit.training.latent_cache import LATENTS_NAME, check_vae_fits, load_or_build, vae_fingerprint
from diffusekit.training.latent_config import LatentTrainConfig
from diffusekit.training.latent_export import export_latent_pipeline, latent_sampler_config
from diffusekit.training.loop import SAMPLES_DIR, TrainingLoop
from diffusekit.training.losses import loss_inputs, offset_noise, weighted_mse
from diffusekit.training.memory import check_training_memory
from diffusekit.training.monitor import MetricsLogger
from diffusekit.training.presets import build_unet_config
from diffusekit.training.randomness import BatchRandomness, micro_batch_generator
from diffusekit.training.text_vocab import train_tokenizer

EXPORT_DIR = "model"
PREVIEW_PROMPTS = 8  # distinct captions shown in a text model's preview grid


class LatentModel(nn.Module):
    """The networks trained together: the U-Net and, for captions without a pretrained encoder, the text encoder.
    ``forward(x, t, class_labels=, input_ids=, context=)``: the text encoder turns ``input_ids`` into the
    cross-attention ``context`` (or ``context`` is given, from a frozen encoder)."""

    def __init__(self, unet: UNet, text_encoder: ClipTextEncoder | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        class_labels: Tensor | None = None,
        input_ids: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        if input_ids is not None:
            context = self.text_encoder(input_ids).last_hidden_state  # (B, L, D)
        return self.unet(x, t, context=context, class_labels=class_labels)


class LatentTrainer(TrainingLoop):
    """Trains a U-Net on the cached latents of a frozen VAE as a :class:`LatentTrainConfig` says (see the module
    docstring); ``fit()`` (training.loop) runs to the end of the budget and exports the pipeline folder.
    ``dataset`` overrides ``config.data`` (an in-memory dataset)."""

    CONFIG_KEYS = ("train", "unet", "latent_state")

    def __init__(
        self,
        config: LatentTrainConfig,
        *,
        resume: str | os.PathLike | None = None,
        dataset: TrainDataset | None = None,
        env: ddp.DistEnv | None = None,
        on_step_end: Callable[[LatentTrainer, int], None] | None = None,
    ) -> None:
        super().__init__(config, resume=resume, env=env, on_step_end=on_step_end)
        c, state, lc = self.config, self.resume_state, self.config.latent
        if lc.vae is None:
            raise ConfigError("latent.vae (--latent VAE_FOLDER) must name the frozen VAE whose latents are trained on")
        saved = state.config["latent_state"] if state is not None else None
        self.vae = load_vae(lc.vae).requires_grad_(False)
        vae_key = vae_fingerprint(lc.vae)
        if saved is not None and saved.get("vae") != vae_key:  # before any latent is encoded with it
            raise CheckpointError(
                f"{state.path}: the checkpoint was trained on the latents of another VAE than "
                f"the one now in {lc.vae}; resume with the same VAE"
            )

        # data, conditioning, captions
        ds = dataset or dataset_from_config(c.data, default_channels=self.vae.config.in_channels)
        check_vae_fits(self.vae, ds)
        self.mode = _conditioning(c, ds)
        texts: list[str] | None = None
        if self.mode == "text":
            ds, texts = _captions(c, ds)
        self.dataset, self.texts = ds, texts
        self.num_classes = ds.num_classes if self.mode == "class" else None
        self.flips = random_flip_of(c.data)

        # the latent cache: rank 0 encodes (or finds) it, the other ranks read it after the barrier
        path = Path(lc.cache) if lc.cache else self.run_dir / LATENTS_NAME
        build = dict(
            vae_key=vae_key,
            flips=self.flips,
            batch_size=lc.encode_batch_size,
            device=self.env.device,
            progress=c.run.progress and self.env.is_main,
        )
        if self.env.is_main:
            self.cache = load_or_build(path, self.vae.to(self.env.device), ds, **build)
        ddp.barrier(self.env)
        if not self.env.is_main:
            self.cache = load_or_build(path, self.vae.to(self.env.device), ds, **build)
        if saved is not None and saved.get("data") != self.cache.key.data:
            raise CheckpointError(
                f"{state.path}: the checkpoint was trained on other data than {c.data.source!r} "
                "now holds; resume with the same data"
            )

        # text encoder and tokenizer
        self.tokenizer: ClipTokenizer | None = None
        self.frozen_text_encoder: ClipTextEncoder | None = None
        text_encoder: ClipTextEncoder | None = None
        if self.mode == "text":
            if lc.text_encoder is not None:
                self.tokenizer = load_tokenizer(lc.text_encoder)
                self.frozen_text_encoder = load_text_encoder(lc.text_encoder, device=self.env.device)
                self.frozen_text_encoder.requires_grad_(False).eval()
                context_dim = self.frozen_text_encoder.config.hidden_size
            else:
                if saved is not None:
                    self.tokenizer = ClipTokenizer(
                        saved["tokenizer"]["vocab"], saved["tokenizer"]["merges"], model_max_length=lc.text_length
                    )
                    te_config = TextEncoderConfig.from_dict(saved["text_encoder"])
                else:
                    self.tokenizer = train_tokenizer(texts, vocab_size=lc.vocab_size, model_max_length=lc.text_length)
                    te_config = _text_encoder_config(c, self.tokenizer)
                torch.manual_seed(c.run.seed)
                text_encoder = ClipTextEncoder(te_config)
                context_dim = te_config.hidden_size
            self.input_ids = self.tokenizer(texts)  # (N, L)
            self.empty_ids = self.tokenizer("")  # (1, L): the empty prompt, for dropped captions (CFG)
        else:
            context_dim = None

        # the U-Net (identical initial weights on every rank)
        torch.manual_seed(c.run.seed)
        latent_c, latent_res = self.cache.latent_shape[0], self.cache.latent_shape[1]
        if saved is not None:
            try:
                self.unet_config = UNetConfig.from_dict(state.config["unet"])
            except ConfigError as e:
                raise CheckpointError(f"{state.path}: config.json: unet: {e}") from None
        else:
            self.unet_config = build_unet_config(
                c.model.preset,
                c.model.overrides,
                channels=latent_c,
                resolution=latent_res,
                num_classes=self.num_classes,
                context_dim=context_dim,
                pixels_per_input=self.vae.config.downsample_factor,
            )
        if self.unet_config.in_channels != latent_c:
            raise ConfigError(
                f"the U-Net takes {self.unet_config.in_channels}-channel inputs but the VAE {lc.vae} "
                f"makes {latent_c}-channel latents (model.overrides in_channels/out_channels must "
                "match the VAE's latent_channels)"
            )
        device = self.env.device
        check_training_memory(
            self.unet_config, channels=latent_c, resolution=latent_res, batch_size=c.optim.batch_size, device=device
        )
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        plan = Plan(dtype=torch.float32, channels_last=device.type == "cpu", inference=False)
        unet = prepare(UNet(self.unet_config), plan, device=device)
        if text_encoder is not None:
            text_encoder = prepare(text_encoder, Plan(dtype=torch.float32, inference=False), device=device)
        self.schedule = NoiseSchedule.from_name(
            c.diffusion.beta_schedule,
            c.diffusion.num_train_timesteps,
            c.diffusion.beta_start,
            c.diffusion.beta_end,
            c.diffusion.zero_terminal_snr,
        )
        self._init_training(LatentModel(unet, text_encoder))

    # ------------------------------------------------------------------------------------------- parts
    def checkpoint_config(self) -> dict[str, Any]:
        """The run's config, the U-Net's, what the latents were made from, and a scratch text encoder's
        config and vocabulary (so that a resumed run tokenizes exactly as before)."""
        state: dict[str, Any] = {
            "vae": self.cache.key.vae,
            "data": self.cache.key.data,
            "mode": self.mode,
            "size": len(self.dataset),
        }
        te = self.model.text_encoder
        if te is not None and self.tokenizer is not None:
            state["text_encoder"] = te.config.to_dict()
            state["tokenizer"] = {"vocab": self.tokenizer.vocab, "merges": [list(m) for m in self.tokenizer.merges]}
        return {"train": self.config.to_dict(), "unet": self.unet_config.to_dict(), "latent_state": state}

    def _batches(self) -> Iterator[Tensor]:
        """This rank's micro-batches of example indices, continuing at ``self.data_position``."""
        return self._index_batches(len(self.cache))

    def _conditioning(self, idx: Tensor, drop: Tensor) -> dict[str, Tensor]:
        """The model's conditioning keywords for examples ``idx``; ``drop`` marks label/caption dropout."""
        device = self.env.device
        if self.mode == "class":
            labels = torch.tensor([self.dataset.label(int(i)) for i in idx], dtype=torch.long)
            return {"class_labels": torch.where(drop, self.num_classes, labels).to(device)}
        if self.mode == "text":
            ids = torch.where(drop[:, None], self.empty_ids, self.input_ids[idx]).to(device)  # (B, L)
            if self.frozen_text_encoder is None:
                return {"input_ids": ids}
            with torch.no_grad():
                return {"context": self.frozen_text_encoder(ids).last_hidden_state}
        return {}

    def _accumulate(
        self, model: nn.Module, batch: Tensor, micro: int, *, last: bool, amp: contextlib.AbstractContextManager
    ) -> Tensor:
        """Forward and backward of this rank's slice of global micro-batch ``micro`` (DDPM Algorithm 1, lines
        2-5, on latents); gradients accumulate (DDP synchronises them on the ``last`` micro-batch)."""
        c, env = self.config, self.env
        B, shape = c.optim.batch_size, self.cache.latent_shape
        gen = micro_batch_generator(c.run.seed, micro)
        rnd = BatchRandomness.draw(
            gen, self.global_batch, shape, self.schedule.num_train_timesteps, c.diffusion.label_dropout
        )
        posterior = torch.randn((self.global_batch, *shape), generator=gen)  # drawn after: rnd stays the pixel one
        lo, hi = env.rank * B, (env.rank + 1) * B
        rnd, posterior = rnd.slice(lo, hi), posterior[lo:hi]
        idx = batch
        z0 = self.cache.latents(
            idx, flipped=rnd.flip if self.flips else None, noise=posterior if c.latent.posterior == "sample" else None
        ).to(env.device)
        noise = rnd.noise.to(env.device)
        if c.diffusion.offset_noise:
            noise = offset_noise(noise, rnd.offset.to(env.device), c.diffusion.offset_noise)
        cond = self._conditioning(idx, rnd.drop_label)
        x_t, t, target, weights = loss_inputs(self.schedule, c.diffusion, z0, noise, rnd.t.to(env.device), rnd.normal)
        x_t = x_t.contiguous(memory_format=self.memory_format)
        sync = self.ddp_model is None or last
        with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
            with amp:
                out = model(x_t, t, **cond)
            loss = weighted_mse(out, target, weights)
            scaled = loss / c.optim.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    # ------------------------------------------------------------------------------------------- outputs
    def _text_encoder_for_export(self) -> ClipTextEncoder | None:
        return self.ema.text_encoder if self.ema.text_encoder is not None else self.frozen_text_encoder

    def _export(self) -> Path:
        return export_latent_pipeline(
            self.ema.unet,
            self.vae,
            self.config.diffusion,
            self.run_dir / EXPORT_DIR,
            tokenizer=self.tokenizer,
            text_encoder=self._text_encoder_for_export(),
        )

    def preview_prompts(self, n: int) -> list[str]:
        """The first distinct captions of the data (up to ``PREVIEW_PROMPTS``), repeated to ``n``."""
        distinct = list(dict.fromkeys(self.texts or [""]))[:PREVIEW_PROMPTS]
        return [distinct[i % len(distinct)] for i in range(n)]

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, steps: int | None = None, guidance_scale: float = 1.0) -> Tensor:
        """n images (n, C, H, W) in [0, 1] from the EMA weights with DDIM, decoded by the VAE: previews show
        class j in column j, or the data's first captions."""
        from diffusekit.pipelines.common import LatentCodec
        from diffusekit.pipelines.stable_diffusion import StableDiffusion
        from diffusekit.pipelines.text_to_image import TextToImage
        from diffusekit.pipelines.unconditional import UnconditionalPipeline

        steps = steps or self.config.run.sample_steps
        config = latent_sampler_config(self.config.diffusion, "ddim")
        codec, generator = LatentCodec(self.vae), torch.Generator().manual_seed(seed)
        ema = self.ema.eval()
        size = self.dataset.resolution
        if self.mode == "text":
            sd = StableDiffusion(
                unet=ema.unet,
                codec=codec,
                tokenizer=self.tokenizer,
                text_encoder=self._text_encoder_for_export(),
                sampler_config=config,
            )
            return TextToImage(sd)(
                self.preview_prompts(n),
                height=size,
                width=size,
                steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                show_progress=False,
            ).images
        labels = None if self.num_classes is None else torch.arange(n) % self.num_classes
        pipe = UnconditionalPipeline(ema.unet, config, codec)
        return pipe(
            n,
            steps=steps,
            height=size,
            width=size,
            generator=generator,
            class_labels=labels,
            guidance_scale=guidance_scale,
            show_progress=False,
        )

    def _write_samples(self, logger: MetricsLogger | None) -> Path:
        from diffusekit.io.images import make_grid, save_image_grid

        n = self.config.run.num_sample_images
        images = self.sample(n, seed=self.config.run.seed)
        nrow = self.num_classes or (min(PREVIEW_PROMPTS, len(set(self.texts or []))) if self.texts else None)
        path = save_image_grid(images, self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png", nrow=nrow, scale=2)
        if logger is not None:
            logger.log_images("samples/ema_ddim", make_grid(images, nrow=nrow), self.step)
        return path

    def _header_lines(self) -> list[str]:
        c, ds = self.config, self.dataset
        n_unet = sum(p.numel() for p in self.model.unet.parameters())
        C, h, w = self.cache.latent_shape
        if self.mode == "class":
            cond = f"class-conditional ({self.num_classes} classes + 'no class')"
        elif self.frozen_text_encoder is not None:
            cond = f"caption-conditioned, frozen text encoder {c.latent.text_encoder}"
        elif self.mode == "text":
            cond = f"caption-conditioned, text encoder trained from scratch ({len(self.tokenizer.vocab)}-token BPE)"
        else:
            cond = "unconditional"
        return [
            f"diffusekit train --latent: {len(ds)} images {ds.channels}x{ds.resolution}x{ds.resolution} from "
            f"{c.data.source!r} -> latents {C}x{h}x{w} of {c.latent.vae} (posterior {c.latent.posterior}"
            f"{', flips encoded' if self.flips else ''})",
            f"  model: {c.model.preset} U-Net, {n_unet / 1e6:.2f}M parameters, {cond}",
            f"  batch: {c.optim.batch_size} x {c.optim.grad_accum_steps} accumulation x {self.env.world_size} "
            f"process(es); device {self.env.device}",
            f"  run folder: {self.run_dir}" + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
        ]


# ----------------------------------------------------------------------------------------------- helpers
def _conditioning(c: LatentTrainConfig, ds: TrainDataset) -> str:
    """``latent.conditioning`` resolved: ``auto`` is text when the folder has caption files or a caption is
    configured, else class when the data has labels, else none."""
    lc = c.latent
    if lc.conditioning != "auto":
        mode = lc.conditioning
    elif (
        lc.caption is not None
        or lc.class_captions
        or (isinstance(ds, ImageFolderDataset) and any(p.with_suffix(".txt").is_file() for p in ds.files))
    ):
        mode = "text"
    else:
        mode = "class" if ds.num_classes > 0 and c.model.class_conditional is not False else "none"
    if mode == "class" and ds.num_classes == 0:
        raise ConfigError(
            "latent.conditioning is 'class' but the data has no labels (class sub-folders or a labelled dataset)"
        )
    return mode


def _captions(c: LatentTrainConfig, ds: TrainDataset) -> tuple[TrainDataset, list[str]]:
    """The dataset (without images whose caption file is unusable, with ``data.skip_bad_images``) and one
    caption per image: ``latent.class_captions`` by label, caption files of an image folder, or
    ``latent.caption`` for every image."""
    lc = c.latent
    if lc.class_captions:
        if ds.num_classes == 0 or len(lc.class_captions) != ds.num_classes:
            raise ConfigError(
                f"latent.class_captions has {len(lc.class_captions)} captions; the data has "
                f"{ds.num_classes} classes (one caption per class)"
            )
        return ds, [lc.class_captions[ds.label(i)] for i in range(len(ds))]
    if isinstance(ds, ImageFolderDataset):
        caps = read_captions(ds.files, default=lc.caption, skip_bad=c.data.skip_bad_images)
        return keep_images(ds, caps.kept), caps.texts
    if lc.caption is None:
        raise ConfigError(
            f"data.source {c.data.source!r} is no image folder, so it has no caption files; give "
            "--caption TEXT (latent.caption) or latent.class_captions"
        )
    return ds, [lc.caption] * len(ds)


def _text_encoder_config(c: LatentTrainConfig, tok: ClipTokenizer) -> TextEncoderConfig:
    """A small CLIP text transformer for a scratch vocabulary (GELU MLP 4x wide, as CLIP's)."""
    lc = c.latent
    return TextEncoderConfig(
        vocab_size=len(tok.vocab),
        hidden_size=lc.text_width,
        num_layers=lc.text_layers,
        num_heads=lc.text_heads,
        mlp_size=4 * lc.text_width,
        max_positions=lc.text_length,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )


__all__ = ["EXPORT_DIR", "LatentModel", "LatentTrainer"]
