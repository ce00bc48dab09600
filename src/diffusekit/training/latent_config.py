"""The configuration of latent diffusion training (``diffusekit train --latent VAE_FOLDER``): the sections
``data``, ``model``, ``diffusion``, ``optim``, ``ema`` and ``run`` of :mod:`diffusekit.training.config` plus
``latent`` (the frozen VAE, the latent cache, the conditioning). Example (TOML)::

    [data]
    source = "photos/"          # image.png + image.txt captions
    resolution = 64
    [latent]
    vae = "my-vae/"             # a VAE folder or a pipeline folder holding vae/
    conditioning = "text"       # text encoder trained from scratch on a BPE vocabulary of the captions
    [model]
    preset = "latent-small"
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import MAX_WIDTH, check_int
from diffusekit.training.config import (
    DataConfig,
    DiffusionConfig,
    EMAConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SectionedConfig,
)
from diffusekit.training.text_vocab import BASE_SYMBOLS, DEFAULT_VOCAB_SIZE, MAX_VOCAB_SIZE

CONDITIONINGS = ("auto", "none", "class", "text")
POSTERIORS = ("sample", "mean")
MAX_TEXT_LAYERS = 48
MAX_CONTEXT = 77  # CLIP's context length; the tokenizer pads every caption to it


@dataclass
class LatentConfig:
    """The latent side of the run.

    ``vae``: a VAE folder (or a diffusers pipeline folder holding ``vae/``), frozen; its latent channels and
    downsampling factor set the U-Net's channels and size. ``cache``: the latent cache file (None: ``latents
    .safetensors`` in the run folder); a cache of another VAE or data is rebuilt (``diffusekit.training
    .latent_cache``). ``posterior``: ``sample`` draws z ~ q(z|x) afresh every time an image is used (as Stable
    Diffusion trains), ``mean`` uses the posterior mean. ``encode_batch_size``: images per VAE pass when caching.
    ``conditioning``: ``class`` (labels of class sub-folders / labelled datasets), ``text`` (captions), ``none``,
    or ``auto`` (text when the image folder has caption files or ``caption``/``class_captions`` is set, else class
    labels when there are any, else none). Label (or caption) dropout for classifier-free guidance is
    ``diffusion.label_dropout``; a dropped caption is the empty prompt.
    ``caption``: the caption of images without a ``.txt`` file. ``class_captions``: one caption per class of a
    labelled dataset (e.g. "a handwritten seven" for the digits), used instead of caption files.
    ``text_encoder``: a pretrained CLIP text encoder folder (a pipeline folder with ``text_encoder/`` and
    ``tokenizer/``), kept frozen; None trains one from scratch (``text_width`` wide, ``text_layers`` deep,
    ``text_heads`` heads) on a BPE vocabulary of at most ``vocab_size`` tokens learned from the captions.
    """

    vae: str | None = None
    cache: str | None = None
    posterior: str = "sample"
    encode_batch_size: int = 32
    conditioning: str = "auto"
    caption: str | None = None
    class_captions: list[str] | None = None
    text_encoder: str | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_length: int = MAX_CONTEXT

    def validate(self) -> None:
        for name in ("vae", "cache", "caption", "text_encoder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"latent.{name} must be a string, got {value!r}")
        check_choice("latent.posterior", self.posterior, POSTERIORS)
        check_choice("latent.conditioning", self.conditioning, CONDITIONINGS)
        check_int("latent.encode_batch_size", self.encode_batch_size, 1, 4096)
        check_int("latent.vocab_size", self.vocab_size, BASE_SYMBOLS, MAX_VOCAB_SIZE)
        check_int("latent.text_width", self.text_width, 1, MAX_WIDTH)
        check_int("latent.text_layers", self.text_layers, 1, MAX_TEXT_LAYERS)
        check_int("latent.text_heads", self.text_heads, 1, MAX_WIDTH)
        check_int("latent.text_length", self.text_length, 2, MAX_CONTEXT)
        if self.text_width % self.text_heads:
            raise ConfigError(
                f"latent.text_width={self.text_width} must be divisible by latent.text_heads={self.text_heads}"
            )
        if self.class_captions is not None and (
            not isinstance(self.class_captions, list) or not all(isinstance(c, str) for c in self.class_captions)
        ):
            raise ConfigError(f"latent.class_captions must be a list of strings, got {self.class_captions!r}")
        if self.conditioning in ("class", "none") and (self.caption is not None or self.class_captions):
            raise ConfigError(
                f"latent.caption / latent.class_captions need latent.conditioning 'text' or 'auto', "
                f"not {self.conditioning!r}"
            )


def _latent_diffusion() -> DiffusionConfig:
    """Stable Diffusion's forward process: scaled-linear betas from 0.00085 to 0.012 over 1000 steps (the
    schedule latent models are trained with; the pixel default is DDPM's linear 1e-4 .. 0.02)."""
    return DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass
class LatentTrainConfig(SectionedConfig):
    """The whole latent-diffusion training configuration (every section above)."""

    WHAT = "a latent training config"  # in messages

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="latent-small"))
    diffusion: DiffusionConfig = field(default_factory=_latent_diffusion)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def validate(self) -> LatentTrainConfig:
        super().validate()
        if self.diffusion.preconditioning != "none":
            raise ConfigError(
                "latent training supports diffusion.preconditioning 'none' only (the EDM "
                "preconditioning's sigma_data is set for pixels)"
            )
        return self


__all__ = ["CONDITIONINGS", "POSTERIORS", "LatentConfig", "LatentTrainConfig"]
