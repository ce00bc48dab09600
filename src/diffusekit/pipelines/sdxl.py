"""Stable Diffusion XL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis"): text-to-image and image-to-image.

What SDXL adds to the Stable Diffusion parts (sec. 2.1-2.2 of the paper):

* two text encoders, CLIP ViT-L and the projection-headed OpenCLIP ViT-bigG; the ``context`` is the output of
  the second-to-last layer of each (no final LayerNorm), concatenated along the features (encoder 1 first), and
  the second encoder's projected pooled feature enters the U-Net's ``emb``;
* micro-conditioning: the original image size, the crop's top-left corner and the target size
  (``time_ids`` = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]) enter ``emb`` with the pooled text
  (:class:`~diffusekit.networks.unet.UNet`'s ``text_time_features``);
* with ``force_zeros_for_empty_prompt`` (the released models), guidance without a negative prompt uses zeros
  for the negative text states and pooled embedding instead of encoding "".

The loop is the one every pipeline runs (:func:`~diffusekit.pipelines.denoise.denoise`) with classifier-free
guidance over [negative; positive]; image-to-image is SDEdit (Meng et al. 2022) started with the sampler's own
forward noise (``x0 + sigma noise`` for Euler-type samplers).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, check_range
from diffusekit.limits import MAX_SAMPLE_SIZE, check_int
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import GeneratorArg, draw
from diffusekit.pipelines.denoise import GenerationResult, denoise, grid_for, sampler_for
from diffusekit.pipelines.img2img import check_image
from diffusekit.pipelines.stable_diffusion import Prompts, StableDiffusion, as_prompt_list, latent_shape
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.samplers.common import Model, StepInfo
from diffusekit.samplers.config import noised_state
from diffusekit.samplers.guidance import Gate, guided

#: The number of micro-conditioning values: original size (2), crop corner (2), target size (2).
NUM_TIME_IDS = 6
Size = tuple[int, int]


@dataclass(frozen=True)
class TextEmbeddings:
    """``context`` (B, 77, D1 + D2): both encoders' penultimate hidden states, concatenated; ``pooled`` (B, P):
    the second encoder's projected pooled feature."""

    context: Tensor
    pooled: Tensor

    def zeros_like(self) -> TextEmbeddings:
        return TextEmbeddings(torch.zeros_like(self.context), torch.zeros_like(self.pooled))


@dataclass(kw_only=True)
class StableDiffusionXL(StableDiffusion):
    """The parts of an SDXL model: those of :class:`StableDiffusion` (``tokenizer`` / ``text_encoder`` are the
    first, CLIP ViT-L pair; the U-Net has the added text/time embedding), plus the second, projection-headed
    text encoder with its tokenizer (which pads with ``!``, id 0) and ``force_zeros_for_empty_prompt``."""

    tokenizer_2: ClipTokenizer
    text_encoder_2: ClipTextEncoder
    force_zeros_for_empty_prompt: bool = True
    name: str = "stable-diffusion-xl"

    def prepare(self, plan: Plan | None = None) -> StableDiffusionXL:
        """:meth:`StableDiffusion.prepare`, and the same plan for the second text encoder."""
        plan = plan or Plan()
        super().prepare(plan)
        prepare(self.text_encoder_2, dataclasses.replace(plan, dtype=plan.dtype or self.dtype))
        return self

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Both encoders on ``prompts``: the penultimate layers' states concatenated (encoder 1 first), and
        encoder 2's projection of its final state at the first end-of-text token (Podell et al. 2023, sec. 2.1)."""
        ids_1 = self.tokenizer(prompts).to(self.device)
        ids_2 = self.tokenizer_2(prompts).to(self.device)
        out_1 = self.text_encoder(ids_1)
        out_2 = self.text_encoder_2(ids_2)
        context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, D1 + D2)
        return TextEmbeddings(context.to(self.dtype), out_2.text_embeds.to(self.dtype))  # pooled (B, P)

    def encode_text(self, prompts: list[str]) -> Tensor:
        """The cross-attention ``context`` (B, 77, D1 + D2) for ``prompts`` (see :meth:`encode`)."""
        return self.encode(prompts).context

    def default_size(self) -> int:
        """Image side the U-Net was trained at (its ``sample_size`` in latent pixels x the VAE factor; 1024
        when the config does not say)."""
        size = self.unet.config.sample_size
        return 1024 if size is None else size * self.codec.downsample_factor


def check_xl_parts(
    where: str | os.PathLike,
    unet: UNet,
    vae: AutoencoderKL,
    text_pairs: Sequence[tuple[ClipTokenizer, ClipTextEncoder]],
) -> None:
    """Raise ConfigError naming ``where`` when the parts of an SDXL model do not fit together: the U-Net's
    cross-attention width against the sum of the encoders' widths, its added embedding against the second
    encoder's projection and the six time ids, its channels against the VAE's latents, each tokenizer against
    its encoder."""
    u = unet.config
    (_, te_1), (_, te_2) = text_pairs
    problems = []
    width = te_1.config.hidden_size + te_2.config.hidden_size
    if u.cross_attention_dim != width:
        problems.append(f"unet cross_attention_dim={u.cross_attention_dim}, text_encoder + text_encoder_2 "
                        f"hidden sizes={width}")  # fmt: skip
    projection = te_2.config.projection_dim
    if projection is None:
        problems.append("text_encoder_2 has no text_projection (a CLIPTextModelWithProjection is needed)")
    elif u.text_time_features is None:
        problems.append("unet has no added text/time embedding (addition_embed_type 'text_time')")
    elif u.text_time_features != projection + NUM_TIME_IDS * u.time_id_features:
        problems.append(
            f"unet projection_class_embeddings_input_dim={u.text_time_features}, expected {projection} "
            f"(text_encoder_2 projection_dim) + {NUM_TIME_IDS} x {u.time_id_features} (addition_time_embed_dim)"
        )
    latent = vae.config.latent_channels
    if u.in_channels != latent or u.out_channels != latent:
        problems.append(f"unet in/out channels={u.in_channels}/{u.out_channels}, vae latent_channels={latent}")
    for suffix, (tok, enc) in zip(("", "_2"), text_pairs):
        top_id = max(tok.vocab.values(), default=0)
        if top_id >= enc.config.vocab_size:
            problems.append(f"tokenizer{suffix} ids reach {top_id}, text_encoder{suffix} "
                            f"vocab_size={enc.config.vocab_size}")  # fmt: skip
        if tok.model_max_length > enc.config.max_positions:
            problems.append(f"tokenizer{suffix} model_max_length={tok.model_max_length}, text_encoder{suffix} "
                            f"max_position_embeddings={enc.config.max_positions}")  # fmt: skip
    if problems:
        raise ConfigError(f"{where}: the SDXL model's components do not fit together: " + "; ".join(problems))


def micro_conditioning(
    height: int, width: int, original_size: Size | None = None, crops_coords_top_left: Size = (0, 0),
    target_size: Size | None = None,
) -> Tensor:  # fmt: skip
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2) as the U-Net's ``time_ids`` row (6,) float32:
    ``original_size`` (height, width) of the training image before resizing, ``crops_coords_top_left``
    (top, left) of the crop, ``target_size`` (height, width); sizes default to (height, width)."""
    values = []
    for name, pair, low in (
        ("original_size", original_size or (height, width), 1),
        ("crops_coords_top_left", crops_coords_top_left, 0),
        ("target_size", target_size or (height, width), 1),
    ):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ConfigError(f"{name} must be a pair of integers ({'top, left' if low == 0 else 'height, width'}), "
                              f"got {pair!r}")  # fmt: skip
        values += [check_int(f"{name}[{i}]", v, low, MAX_SAMPLE_SIZE) for i, v in enumerate(pair)]
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class XLConditioning:
    """Encoded prompts and, with guidance, the negative ones (zeros under ``force_zeros_for_empty_prompt``)."""

    text: TextEmbeddings
    negative: TextEmbeddings | None
    guidance_scale: float

    @property
    def batch(self) -> int:
        return self.text.context.shape[0]

    def model(self, unet: UNet, time_ids: Tensor, gate: Gate | None = None) -> Model:
        """The U-Net as a model(x, t) with classifier-free guidance over [negative; positive]; ``time_ids``
        (6,) is the same for every row, negative ones included. Where ``gate`` says no, the positive half alone
        (guidance in a limited interval of noise levels, Kynkäänniemi et al. 2024)."""
        ids = time_ids.to(self.text.pooled.device, self.text.pooled.dtype).expand(self.batch, -1)  # (B, 6)
        cond = {"context": self.text.context, "pooled": self.text.pooled, "time_ids": ids}
        if self.negative is None:
            return guided(unet, 1.0, {}, cond)
        uncond = {"context": self.negative.context, "pooled": self.negative.pooled, "time_ids": ids}
        return guided(unet, self.guidance_scale, uncond, cond, gate=gate)


def encode_prompts_xl(
    sd: StableDiffusionXL, prompt: Prompts, negative_prompt: Prompts | None, guidance_scale: float
) -> XLConditioning:
    """Encode prompts; when ``guidance_scale`` != 1 also the negative prompts: zeros when none is given and the
    model has ``force_zeros_for_empty_prompt``, else the given ones ("" where none is given). An explicit ""
    is encoded, as the reference does."""
    check_range("guidance_scale", guidance_scale, 0.0, 1e4)
    prompts = as_prompt_list(prompt)
    text = sd.encode(prompts)
    if guidance_scale == 1.0:
        return XLConditioning(text, None, guidance_scale)
    if negative_prompt is None and sd.force_zeros_for_empty_prompt:
        return XLConditioning(text, text.zeros_like(), guidance_scale)
    negatives = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt", len(prompts))
    return XLConditioning(text, sd.encode(negatives), guidance_scale)


class TextToImageXL:
    """prompt -> both encoders -> sampler loop over the U-Net with micro-conditioning and guidance -> VAE decode."""

    def __init__(self, sd: StableDiffusionXL):
        if not isinstance(sd, StableDiffusionXL):
            raise ConfigError(f"TextToImageXL needs an SDXL model, got {type(sd).__name__}")
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        *,
        negative_prompt: Prompts | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance_scale: float = 5.0,
        guidance_interval: Sequence[float] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: GeneratorArg = None,
        latents: Tensor | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """Generate one image per prompt, ``height`` x ``width`` (default: the model's training size).
        ``latents`` (B, 4, H/f, W/f) replaces the initial noise draw. ``original_size``, ``crops_coords_top_left``
        and ``target_size`` are the micro-conditioning (defaults: (height, width), (0, 0), (height, width)).
        ``guidance_interval`` (lo, hi) applies the guidance only at noise levels lo < sigma <= hi (Kynkäänniemi et
        al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
        Models": (0.28, 5.42] for SD-XL; hi may be inf), the conditional model alone elsewhere; None: every step."""
        sd = self.sd
        height = sd.default_size() if height is None else height
        width = sd.default_size() if width is None else width
        cond = encode_prompts_xl(sd, prompt, negative_prompt, guidance_scale)
        shape = latent_shape(sd, cond.batch, height, width)
        ids = micro_conditioning(height, width, original_size, crops_coords_top_left, target_size)
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps)
        if latents is None:
            latents = draw(shape, generator, sd.dtype, sd.device)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} for {height}x{width}, got {tuple(latents.shape)}")
        x = latents.to(sd.device, sd.dtype) * grid.init_noise_sigma
        model = cond.model(sd.unet, ids, config.guidance_gate(guidance_interval))
        return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress)


class ImageToImageXL:
    """Encode the image, noise it to the level of the first step kept, denoise with micro-conditioning and
    guidance, decode (SDEdit, Meng et al. 2022)."""

    def __init__(self, sd: StableDiffusionXL):
        if not isinstance(sd, StableDiffusionXL):
            raise ConfigError(f"ImageToImageXL needs an SDXL model, got {type(sd).__name__}")
        self.sd = sd

    @torch.inference_mode()
    def __call__(
        self,
        prompt: Prompts,
        image: Tensor,
        *,
        strength: float = 0.3,
        negative_prompt: Prompts | None = None,
        steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_interval: Sequence[float] | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: GeneratorArg = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        show_progress: bool = True,
    ) -> GenerationResult:
        """``image`` (B, 3, H, W) in [0, 1]; ``strength`` in (0, 1]: 1 ignores the image's content. The
        micro-conditioning sizes default to the image's (H, W); ``guidance_interval`` as in :class:`TextToImageXL`."""
        sd = self.sd
        cond = encode_prompts_xl(sd, prompt, negative_prompt, guidance_scale)
        image = check_image(image, sd.latent_multiple)
        if image.shape[0] != cond.batch:
            raise ConfigError(f"got {image.shape[0]} images for {cond.batch} prompts")
        ids = micro_conditioning(image.shape[2], image.shape[3], original_size, crops_coords_top_left, target_size)
        config = sampler_for(sd.sampler_config, sampler, eta)
        grid = grid_for(config, steps, strength)
        init = sd.codec.encode(2 * image.to(sd.device, torch.float32) - 1, generator=generator).to(sd.dtype)
        noise = draw(init.shape, generator, init.dtype, init.device)
        x = noised_state(config, grid, init, noise)  # x0 + sigma noise (Euler) or sqrt(abar) x0 + ... (VP)
        model = cond.model(sd.unet, ids, config.guidance_gate(guidance_interval))
        return denoise(sd.codec, config, model, x, grid, generator, callback, show_progress)


__all__ = [
    "ImageToImageXL",
    "StableDiffusionXL",
    "TextEmbeddings",
    "TextToImageXL",
    "XLConditioning",
    "check_xl_parts",
    "encode_prompts_xl",
    "micro_conditioning",
]
