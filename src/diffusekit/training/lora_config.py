"""The configuration of LoRA fine-tuning (``diffusekit train-lora``): one dataclass per section, saved in every
checkpoint and read back on resume.

Sections: ``lora`` (the model, the adapters and the file written at the end), ``data`` (the captioned image
folder), and the loop's own ``optim``, ``ema`` and ``run`` sections of :mod:`diffusekit.training.config`, with
defaults for fine-tuning (lr 1e-4, batch 1, no EMA, 500 steps; only the classic EMA). Unknown sections and keys
are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import MAX_WIDTH, check_flag, check_float, check_int
from diffusekit.training.config import (
    MAX_RESOLUTION_PX,
    EMAConfig,
    OptimConfig,
    RunConfig,
    SectionedConfig,
)

#: Which U-Net layers get adapters. ``attention``: the query, key, value and output projections of every
#: self- and cross-attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``); ``transformer``: every linear layer
#: and 1x1 convolution of the U-Net's transformer layers (those four, ``proj_in``/``proj_out`` and the
#: feed-forward), the set kohya's sd-scripts adapt with ``networks.lora``.
TARGETS = ("attention", "transformer")
FORMATS = ("kohya", "peft")
MAX_ALPHA = 1e6
#: The EMA kinds of a LoRA run (see :meth:`LoraTrainConfig.validate`).
EMA_KINDS = ("classic",)


@dataclass
class LoraSection:
    """The model and its adapters.

    ``model``: an SD-1.x/2.x or SDXL model folder or single file; ``tokenizer``: a tokenizer folder (single files
    carry none). ``rank`` r and ``alpha``: the update is (alpha / r) B A (Hu et al. 2021, eq. 3); alpha None
    means alpha = r. ``targets``: see :data:`TARGETS`. ``train_text_encoder``: adapters on the text encoder(s)
    too (their attention projections and MLPs), trained with ``text_encoder_lr`` (None: ``optim.lr``).
    ``gradient_checkpointing``: recompute the U-Net's activations in the backward pass (less memory, ~30% more
    time). ``caption_dropout``: probability of training an example with the empty prompt (keeps classifier-free
    guidance working). ``min_snr_gamma``: Min-SNR-gamma loss weighting (Hang et al. 2023), None = off.
    ``output``: the ``.safetensors`` written at the end, in ``format`` (``kohya`` or ``peft``).
    """

    model: str = ""
    tokenizer: str | None = None
    rank: int = 4
    alpha: float | None = None
    targets: str = "attention"
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None
    output: str = ""
    format: str = "kohya"

    def validate(self) -> None:
        for name in ("model", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"lora.{name} must be a path, got {value!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ConfigError(f"lora.tokenizer must be a path, got {self.tokenizer!r}")
        check_int("lora.rank", self.rank, 1, MAX_WIDTH)
        if self.alpha is not None:
            self.alpha = check_float("lora.alpha", self.alpha, 0.0, MAX_ALPHA, open_low=True)
        check_choice("lora.targets", self.targets, TARGETS)
        check_flag("lora.train_text_encoder", self.train_text_encoder)
        if self.text_encoder_lr is not None:
            self.text_encoder_lr = check_float("lora.text_encoder_lr", self.text_encoder_lr, 0.0, 10.0)
        check_flag("lora.gradient_checkpointing", self.gradient_checkpointing)
        self.caption_dropout = check_float("lora.caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.min_snr_gamma is not None:
            self.min_snr_gamma = check_float("lora.min_snr_gamma", self.min_snr_gamma, 0.0, 1e6, open_low=True)
        check_choice("lora.format", self.format, FORMATS)

    @property
    def scale_alpha(self) -> float:
        """alpha, defaulting to the rank (scale 1)."""
        return float(self.rank) if self.alpha is None else float(self.alpha)


@dataclass
class LoraDataConfig:
    """The training images: ``source`` a folder of images, each captioned by a ``.txt`` file of the same name
    beside it or, for images without one, by ``caption``. ``resolution``: the square training size in pixels
    (None: the model's own); each image is resized so its shorter side is that, then centre-cropped.
    ``random_flip``: horizontal flips (both flips of every image are encoded once). ``skip_bad_images``: train
    without images (or caption files) that cannot be read instead of refusing the folder."""

    source: str = ""
    caption: str | None = None
    resolution: int | None = None
    random_flip: bool = False
    skip_bad_images: bool = False

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"data.source must be an image folder, got {self.source!r}")
        if self.caption is not None and not isinstance(self.caption, str):
            raise ConfigError(f"data.caption must be a string, got {self.caption!r}")
        if self.resolution is not None:
            check_int("data.resolution", self.resolution, 8, MAX_RESOLUTION_PX)
        check_flag("data.random_flip", self.random_flip)
        check_flag("data.skip_bad_images", self.skip_bad_images)


def _optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, warmup_steps=0, batch_size=1)


def _ema() -> EMAConfig:
    return EMAConfig(decay=0.0, warmup=False)


def _run() -> RunConfig:
    return RunConfig(output_dir="runs/lora", max_steps=500, checkpoint_every=100)


@dataclass
class LoraTrainConfig(SectionedConfig):
    """Every section of a LoRA fine-tuning run (see the module docstring)."""

    WHAT = "a LoRA training config"  # in messages

    lora: LoraSection = field(default_factory=LoraSection)
    data: LoraDataConfig = field(default_factory=LoraDataConfig)
    optim: OptimConfig = field(default_factory=_optim)
    ema: EMAConfig = field(default_factory=_ema)
    run: RunConfig = field(default_factory=_run)

    def validate(self) -> LoraTrainConfig:
        """Every section's checks, and ``ema.kind`` in :data:`EMA_KINDS`: the EMA of a LoRA run averages the
        adapters only, with the classic decay (the power-function EMA's snapshots and post-hoc reconstruction
        are written for whole networks)."""
        super().validate()
        check_choice("ema.kind", self.ema.kind, EMA_KINDS)
        return self


__all__ = ["EMA_KINDS", "FORMATS", "TARGETS", "LoraDataConfig", "LoraSection", "LoraTrainConfig"]
