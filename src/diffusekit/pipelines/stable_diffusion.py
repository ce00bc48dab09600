"""Stable Diffusion components and the helpers every text-conditioned pipeline shares.

Latent diffusion (Rombach et al. 2022): a KL autoencoder (the codec), a CLIP text encoder whose last hidden
state is the cross-attention ``context``, and a conditional U-Net. The pipelines in ``text_to_image``,
``img2img`` and ``inpaint`` are explicit loops over these parts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.errors import ConfigError, WeightsError, check_range
from diffusekit.io.models import load_unet, load_vae, save_unet, save_vae
from diffusekit.io.text import load_text_encoder, load_tokenizer, save_text_encoder, save_tokenizer
from diffusekit.io.weights import read_json, write_json
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import GeneratorArg, LatentCodec, chain, check_size, progress, to_unit_range
from diffusekit.runtime.policy import Plan, default_dtype, prepare
from diffusekit.samplers.common import Model, StepInfo
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.guidance import guided

Prompts = str | Sequence[str]


@dataclass
class StableDiffusion:
    """The parts of a Stable Diffusion 1.x/2.x model."""

    unet: UNet
    codec: LatentCodec
    tokenizer: ClipTokenizer
    text_encoder: ClipTextEncoder
    sampler_config: SamplerConfig
    name: str = "stable-diffusion"
    fast: bool = field(default=True, repr=False, compare=False)  # apply the runtime plan (see prepare())

    def __post_init__(self) -> None:
        if self.fast:
            self.prepare()

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = torch.float32,
        fast: bool = True,
    ) -> StableDiffusion:
        """Load a diffusers-layout folder: ``model_index.json`` + unet/, vae/, text_encoder/, tokenizer/,
        scheduler/. Each component's config is translated into ours; weights load from safetensors only.

        ``dtype`` of the U-Net and text encoder (the VAE stays float32); None picks the machine's default
        (bfloat16 where the device computes it natively, else float32). ``fast``: see :meth:`prepare`."""
        folder = Path(folder)
        dtype = dtype or default_dtype(device)
        if not (folder / "model_index.json").is_file():
            raise WeightsError(f"{folder}: not a model folder (no model_index.json); expected the diffusers layout")
        read_json(folder / "model_index.json")
        sched = folder / "scheduler" / "scheduler_config.json"
        try:
            sampler_config = SamplerConfig.from_reference(read_json(sched)) if sched.exists() else _sd_default_sampler()
        except ConfigError as e:
            raise ConfigError(f"{sched}: {e}") from None
        unet = load_unet(folder / "unet", dtype=dtype, device=device)
        vae = load_vae(folder / "vae", dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(folder / "tokenizer")
        text_encoder = load_text_encoder(folder / "text_encoder", dtype=dtype, device=device)
        check_parts(folder, unet, vae, tokenizer, text_encoder)
        return cls(
            unet=unet,
            codec=LatentCodec(vae),
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            sampler_config=sampler_config,
            name=folder.resolve().name,
            fast=fast,
        )

    def prepare(self, plan: Plan | None = None) -> StableDiffusion:
        """Apply a runtime plan for inference (default: the machine's; keeps each component's dtype) to the
        U-Net and text encoder, and the same layout to the VAE, which stays float32. Returns self. Done on
        construction unless ``fast=False``: eval mode, no parameter gradients, channels-last weights and, for
        half precision on a CPU without native bfloat16, float32 compute (:mod:`diffusekit.runtime.policy`)."""
        plan = plan or Plan()
        prepare(self.unet, dataclasses.replace(plan, dtype=plan.dtype or self.dtype))
        prepare(self.text_encoder, dataclasses.replace(plan, dtype=plan.dtype or self.dtype))
        prepare(self.codec.vae, dataclasses.replace(plan, dtype=torch.float32, compile=False))
        return self

    def save(self, folder: str | os.PathLike) -> None:
        """Write the diffusers layout that ``load`` (and the reference) reads."""
        folder = Path(folder)
        save_unet(self.unet, folder / "unet")
        save_vae(self.codec.vae, folder / "vae")
        save_text_encoder(self.text_encoder, folder / "text_encoder")
        save_tokenizer(self.tokenizer, folder / "tokenizer")
        sched = self.sampler_config.to_reference()
        write_json(sched, folder / "scheduler" / "scheduler_config.json")
        write_json(
            {
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", sched["_class_name"]],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            folder / "model_index.json",
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x U-Net downsampling)."""
        return self.codec.downsample_factor * 2 ** (self.unet.config.levels - 1)

    def encode_text(self, prompts: list[str]) -> Tensor:
        """CLIP last hidden states (B, 77, D) for ``prompts``: the cross-attention context."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids).last_hidden_state.to(self.dtype)


def check_parts(
    where: str | os.PathLike, unet: UNet, vae: AutoencoderKL, tokenizer: ClipTokenizer, text_encoder: ClipTextEncoder
) -> None:
    """Raise ConfigError naming ``where`` when the parts of a model do not fit together (each may be valid on
    its own): the U-Net's cross-attention width against the text encoder's, its channels against the VAE's
    latents (or, for inpainting, latents + mask + masked latents), the tokenizer's ids and length against the
    text encoder's vocabulary and positions."""
    u, t = unet.config, text_encoder.config
    latent = vae.config.latent_channels
    problems = []
    if u.cross_attention_dim != t.hidden_size:
        problems.append(f"unet cross_attention_dim={u.cross_attention_dim}, text_encoder hidden_size={t.hidden_size}")
    if u.out_channels != latent:
        problems.append(f"unet out_channels={u.out_channels}, vae latent_channels={latent}")
    if u.in_channels not in (latent, 2 * latent + 1):
        problems.append(f"unet in_channels={u.in_channels}, allowed: {latent} or {2 * latent + 1} (inpainting)")
    top_id = max(tokenizer.vocab.values(), default=0)
    if top_id >= t.vocab_size:
        problems.append(f"tokenizer ids reach {top_id}, text_encoder vocab_size={t.vocab_size}")
    if tokenizer.model_max_length > t.max_positions:
        problems.append(
            f"tokenizer model_max_length={tokenizer.model_max_length}, "
            f"text_encoder max_position_embeddings={t.max_positions}"
        )
    if problems:
        raise ConfigError(f"{where}: the model's components do not fit together: " + "; ".join(problems))


def _sd_default_sampler() -> SamplerConfig:
    return SamplerConfig(sampler="pndm", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1, set_alpha_to_one=False)  # fmt: skip


def as_prompt_list(prompt: Prompts, name: str = "prompt", batch: int | None = None) -> list[str]:
    """A list of prompt strings; one string is repeated to ``batch`` items."""
    if isinstance(prompt, str):
        prompts = [prompt] * (batch or 1)
    elif isinstance(prompt, Sequence) and len(prompt) > 0 and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise ConfigError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    if batch is not None and len(prompts) != batch:
        raise ConfigError(f"{name} has {len(prompts)} entries but the batch has {batch} prompts")
    return prompts


@dataclass
class Conditioning:
    """Encoded prompts: ``context`` (B, 77, D) and, with guidance, ``negative_context``."""

    context: Tensor
    negative_context: Tensor | None
    guidance_scale: float

    def model(self, unet: UNet, **extra: Tensor) -> Model:
        """The U-Net as a model(x, t) with classifier-free guidance over [negative; positive]."""
        cond = {"context": self.context, **extra}
        if self.negative_context is None:
            return guided(unet, 1.0, {}, cond)
        return guided(unet, self.guidance_scale, {"context": self.negative_context, **extra}, cond)


def encode_prompts(
    sd: StableDiffusion, prompt: Prompts, negative_prompt: Prompts | None, guidance_scale: float
) -> Conditioning:
    """Encode prompts (and, when ``guidance_scale`` != 1, negative prompts; "" where none is given)."""
    check_range("guidance_scale", guidance_scale, 0.0, 1e4)
    prompts = as_prompt_list(prompt)
    context = sd.encode_text(prompts)
    if guidance_scale == 1.0:
        return Conditioning(context, None, guidance_scale)
    negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt", len(prompts))
    return Conditioning(context, sd.encode_text(negatives), guidance_scale)


@dataclass
class GenerationResult:
    """Images (B, 3, H, W) in [0, 1], the final latents, and the sampler's starting state."""

    images: Tensor
    latents: Tensor
    start: Tensor


def latent_shape(sd: StableDiffusion, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    check_size(height, width, sd.latent_multiple)
    f = sd.codec.downsample_factor
    return (batch, sd.codec.channels, height // f, width // f)


def sampler_for(sd: StableDiffusion, sampler: str | None, eta: float | None) -> SamplerConfig:
    """The model's noise schedule with the sampler the caller asked for."""
    cfg = sd.sampler_config
    changes = {"eta": eta} if eta is not None else {}
    return cfg.with_sampler(sampler or cfg.sampler, **changes) if (sampler or changes) else cfg


def denoise(
    sd: StableDiffusion,
    config: SamplerConfig,
    model: Model,
    x: Tensor,
    grid: Grid,
    generator: GeneratorArg,
    callback: Callable[[StepInfo], None] | None,
    show_progress: bool,
    finish: Callable[[Tensor], Tensor] | None = None,
) -> GenerationResult:
    """Run the sampler from state ``x`` along ``grid`` and decode the result."""
    bar = progress(len(grid), show_progress, f"denoising ({config.sampler})")
    latents = run_sampler(config, model, x, grid, generator=generator, callback=chain(callback, bar))
    if finish is not None:
        latents = finish(latents)
    images = sd.codec.decode(latents.float())
    return GenerationResult(to_unit_range(images.float()), latents, x)


def grid_for(config: SamplerConfig, steps: int, strength: float = 1.0) -> Grid:
    """The grid of ``steps`` steps, or with ``strength`` < 1 its last int(steps * strength) steps (SDEdit,
    Meng et al. 2022: start part way down the noise levels). The full grid is built first, so every
    step lands where it would in a full run."""
    full = build_grid(config, steps)
    if strength == 1.0:
        return full
    strength = check_range("strength", strength, 0.0, 1.0)
    n = min(int(steps * strength), steps)
    if n < 1:
        raise ConfigError(f"strength={strength} with steps={steps} runs no step; raise strength or steps")
    return full[steps - n :]
