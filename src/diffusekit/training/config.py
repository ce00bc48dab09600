"""The training configuration: one dataclass per section, read from JSON or TOML, saved in every checkpoint.

A config file has the sections ``data``, ``model``, ``diffusion``, ``optim``, ``ema``, ``run`` and ``task`` with
the field names below; every field is optional. Unknown keys are errors (a typo must not silently train with
defaults). Example (TOML)::

    [data]
    source = "mnist"
    [model]
    preset = "mnist-small"
    [optim]
    lr = 2e-4
    batch_size = 128
    [run]
    max_steps = 20000
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from diffusekit.diffusion.edm import P_MEAN, P_STD, PRECONDITIONINGS, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from diffusekit.diffusion.parametrization import PREDICTION_TYPES
from diffusekit.diffusion.schedules import BETA_SCHEDULES
from diffusekit.errors import ConfigError, check_choice, check_range
from diffusekit.limits import check_flag, check_float, check_int
from diffusekit.pipelines.super_resolution import DOWNSAMPLE_MODES, MAX_SCALE
from diffusekit.training.power_ema import EMA_KINDS, check_sigma_rels

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")
TASKS = ("generate", "super-resolution")

# Upper bounds, checked before anything is loaded or allocated (a typo such as --resolution-px 100000 must
# not meet the OOM killer); far above what pixel-space training on one machine can use. What fits in this
# machine's memory is estimated later, from the model (see ``diffusekit.training.memory``).
MAX_RESOLUTION_PX = 4096
MAX_BATCH = 1 << 20  # images per micro-batch per process
MAX_GRAD_ACCUM = 1 << 16
MAX_STEPS = 10**9  # optimizer steps, and every interval counted in them
MAX_WORKERS = 256
MAX_SAMPLE_IMAGES = 4096
MAX_SAMPLE_STEPS = 10_000
MAX_TRAIN_TIMESTEPS = 100_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; the same bound as the generation commands
MAX_LIMIT = 2**40  # examples


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared (see ``diffusekit.training.data``).

    ``source``: ``bundled`` | ``mnist`` | ``fashion-mnist`` | a folder of images | an IDX or .npz/.npy file.
    ``resolution``: square training size in pixels (None: the source's own). ``random_flip``: horizontal
    flips (None: on for image folders, off for digits and arrays). ``num_workers``: DataLoader processes
    decoding image folders (None: min(4, CPUs)); in-memory sources never need them. ``skip_bad_images``:
    train without the files of an image folder that cannot be decoded (every file is decoded once up front;
    by default a folder with such files is refused, with their list).
    """

    source: str = "bundled"
    data_root: str | None = None
    resolution: int | None = None
    channels: int | None = None
    random_flip: bool | None = None
    limit: int | None = None
    num_workers: int | None = None
    skip_bad_images: bool = False

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"data.source must be a non-empty string, got {self.source!r}")
        if self.resolution is not None:
            check_int("data.resolution", self.resolution, 1, MAX_RESOLUTION_PX)
        if self.limit is not None:
            check_int("data.limit", self.limit, 1, MAX_LIMIT)
        if self.channels is not None:
            check_choice("data.channels", self.channels, (1, 3))
        if self.num_workers is not None:
            check_int("data.num_workers", self.num_workers, 0, MAX_WORKERS)
        check_flag("data.skip_bad_images", self.skip_bad_images)


@dataclass
class ModelConfig:
    """The U-Net: a named preset (``diffusekit.training.presets`` or the UNet registry) plus field overrides.

    ``class_conditional``: embed class labels (None: yes when the dataset has labels and ``label_dropout``
    > 0 or the preset asks for it; see ``Trainer``). The network gets ``num_classes + 1`` class ids: the last
    one is the "no class" id that label dropout trains and classifier-free guidance samples with.
    """

    preset: str = "mnist-small"
    overrides: dict[str, Any] = field(default_factory=dict)
    class_conditional: bool | None = None

    def validate(self) -> None:
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"model.overrides must be a table/object of UNetConfig fields, got {self.overrides!r}")


@dataclass
class DiffusionConfig:
    """The forward process and the loss (DDPM, Ho et al. 2020).

    ``prediction_type``: ``epsilon`` (DDPM eq. 14), ``sample`` (x0) or ``v_prediction`` (Salimans & Ho 2022).
    ``min_snr_gamma``: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their default), None = off.
    ``offset_noise``: strength of per-channel constant noise added to eps (Guttenberg 2023), 0 = off.
    ``label_dropout``: probability of replacing a class label by the "no class" id (classifier-free
    guidance, Ho & Salimans 2022, sec. 3.2).
    ``preconditioning``: ``none`` (the network sees the VP sample at an integer time of the beta schedule) or
    ``edm`` (Karras et al. 2022, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) with data
    standard deviation ``sigma_data``, training levels ln(sigma) ~ N(``p_mean``, ``p_std``^2) and the loss weight
    1 / c_out^2; sampling walks eq. 5's grid over [``sigma_min``, ``sigma_max``]. The beta schedule, the
    prediction type and Min-SNR do not apply to it.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    label_dropout: float = 0.1
    preconditioning: str = "none"
    sigma_data: float = SIGMA_DATA
    p_mean: float = P_MEAN
    p_std: float = P_STD
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX

    def validate(self) -> None:
        check_choice("diffusion.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_int("diffusion.num_train_timesteps", self.num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
        check_range("diffusion.beta_start", self.beta_start, 0.0, 1.0)
        check_range("diffusion.beta_end", self.beta_end, 0.0, 1.0)
        check_choice("diffusion.prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.min_snr_gamma is not None:
            check_range("diffusion.min_snr_gamma", self.min_snr_gamma, 1e-6, 1e6)
        check_range("diffusion.offset_noise", self.offset_noise, 0.0, 10.0)
        check_range("diffusion.label_dropout", self.label_dropout, 0.0, 1.0)
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "diffusion.zero_terminal_snr needs prediction_type 'v_prediction' or 'sample' (an eps-network "
                "cannot predict anything at zero SNR; Lin et al. 2024, sec. 3.2)"
            )
        check_choice("diffusion.preconditioning", self.preconditioning, PRECONDITIONINGS)
        check_float("diffusion.sigma_data", self.sigma_data, 0.0, 1e3, open_low=True)
        check_float("diffusion.p_mean", self.p_mean, -20.0, 20.0)
        check_float("diffusion.p_std", self.p_std, 0.0, 20.0, open_low=True)
        check_float("diffusion.sigma_min", self.sigma_min, 0.0, 1e3, open_low=True)
        check_float("diffusion.sigma_max", self.sigma_max, self.sigma_min, 1e6, open_low=True)
        if self.preconditioning == "edm":
            off = {
                "prediction_type": self.prediction_type != "epsilon",
                "min_snr_gamma": self.min_snr_gamma is not None,
                "zero_terminal_snr": self.zero_terminal_snr,
            }
            if any(off.values()):
                raise ConfigError(
                    f"diffusion.{next(k for k, v in off.items() if v)} does not apply with diffusion.preconditioning "
                    "'edm' (its network output, noise levels and loss weight are Karras et al. 2022's): leave "
                    "prediction_type 'epsilon', min_snr_gamma unset and zero_terminal_snr off"
                )


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with the DDPM defaults: lr 2e-4, betas (0.9, 0.999), 5000 warmup steps
    in the paper (``warmup_steps`` here, linear from 0), then ``lr_schedule``; gradients clipped to norm 1.

    ``batch_size`` is per process and per micro-batch; the global batch of one optimizer step is
    batch_size x grad_accum_steps x number of processes.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 500
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = 1.0
    batch_size: int = 64
    grad_accum_steps: int = 1

    def validate(self) -> None:
        check_float("optim.lr", self.lr, 0.0, 10.0, open_low=True)  # 0 would never change the weights
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, got {self.betas!r}")
        self.betas = (
            check_range("optim.betas[0]", self.betas[0], 0, 1),
            check_range("optim.betas[1]", self.betas[1], 0, 1),
        )
        check_range("optim.eps", self.eps, 0.0, 1.0)
        check_range("optim.weight_decay", self.weight_decay, 0.0, 10.0)
        check_int("optim.warmup_steps", self.warmup_steps, 0, MAX_STEPS)
        check_choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.grad_clip_norm is not None:
            check_range("optim.grad_clip_norm", self.grad_clip_norm, 1e-12, 1e12)
        check_int("optim.batch_size", self.batch_size, 1, MAX_BATCH)
        check_int("optim.grad_accum_steps", self.grad_accum_steps, 1, MAX_GRAD_ACCUM)


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (Polyak & Juditsky 1992; used by DDPM, sec. B).

    ``kind`` ``classic``: the decay at optimizer step n is min(``decay``, (1 + n) / (10 + n)) when ``warmup`` is
    on (the num_updates rule of TensorFlow's ExponentialMovingAverage), so early, random weights are forgotten
    fast. ``power``: the power-function EMA of EDM2 (Karras et al. 2024, sec. 3.1), whose window is a fixed
    fraction of the run, at each of ``sigma_rels`` (that fraction as a relative standard deviation, in
    [0.0001, 0.28]); the previews, checkpoints' EMA and the export use the first one, and every
    ``snapshot_every`` steps (and at each checkpoint) all of them are saved to ``ema_snapshots/``, from which
    ``diffusekit ema-reconstruct`` builds the model of any other sigma_rel after training (appendix C.2).
    ``decay`` and ``warmup`` do not apply to it.
    """

    decay: float = 0.9999
    warmup: bool = True
    kind: str = "classic"
    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every: int = 500

    def validate(self) -> None:
        check_range("ema.decay", self.decay, 0.0, 1.0)
        check_choice("ema.kind", self.kind, EMA_KINDS)
        self.sigma_rels = tuple(check_sigma_rels("ema.sigma_rels", self.sigma_rels))
        check_int("ema.snapshot_every", self.snapshot_every, 1, MAX_STEPS)


@dataclass
class RunConfig:
    """The loop: length, seed, precision, checkpoints and logging (``*_every`` are in optimizer steps).

    ``max_steps`` and ``max_minutes`` (wall-clock training budget; None = none) both stop a run, whichever
    comes first. ``mixed_precision``: ``auto`` (bf16 on GPUs that have it, else fp16 with gradient scaling;
    bf16 on CPUs with native bf16, else float32), ``no``, ``bf16`` or ``fp16`` (GPU only).
    ``keep_checkpoints``: how many of the newest checkpoints to keep (at least 1).
    ``sample_every``: write a grid of EMA samples (DDIM, ``sample_steps`` steps) every so many steps, 0 = off.
    """

    output_dir: str = "runs/train"
    max_steps: int = 10000
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0
    num_sample_images: int = 64
    sample_steps: int = 50
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"run.output_dir must be a path, got {self.output_dir!r}")
        check_int("run.max_steps", self.max_steps, 1, MAX_STEPS)
        if self.max_minutes is not None:  # 0 would train nothing
            check_float("run.max_minutes", self.max_minutes, 0.0, math.inf, open_low=True)
        check_int("run.seed", self.seed, 0, MAX_SEED)
        check_choice("run.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_int("run.checkpoint_every", self.checkpoint_every, 1, MAX_STEPS)
        check_int("run.keep_checkpoints", self.keep_checkpoints, 1, MAX_STEPS)
        check_int("run.log_every", self.log_every, 1, MAX_STEPS)
        check_int("run.sample_every", self.sample_every, 0, MAX_STEPS)
        check_int("run.num_sample_images", self.num_sample_images, 1, MAX_SAMPLE_IMAGES)
        check_int("run.sample_steps", self.sample_steps, 1, MAX_SAMPLE_STEPS)


@dataclass
class TaskConfig:
    """What the network learns. ``kind``: ``generate`` (images from noise) or ``super-resolution`` (SR3,
    Saharia et al. 2021; ``diffusekit.training.super_resolution``): each training image (the high-resolution
    target) is blurred by a Gaussian of ``blur_sigma`` pixels (0 = off), made ``scale`` times smaller
    (``downsample``: ``bicubic`` or ``area``), given Gaussian noise of standard deviation ``noise_std`` (on the
    [-1, 1] scale, 0 = off), upsampled back by bicubic interpolation and stacked onto the network's input.
    ``max_noise_level`` > 0 also noises that condition to a random level 0..max_noise_level of the training
    schedule and gives the level to the network as its class label (cascaded diffusion's noise conditioning
    augmentation); 0 = off. ``crop_px`` > 0 trains on a random ``crop_px`` x ``crop_px`` window of each
    ``data.resolution``-sized image (a new window per example and step, drawn from the step's seeded
    generator), so large images are learned at full detail; the model's training size is then ``crop_px`` and
    ``diffusekit upscale`` tiles larger inputs; 0 = the whole image. The other fields are ignored when ``kind``
    is ``generate``, which refuses ``crop_px``.
    """

    kind: str = "generate"
    scale: int = 4
    downsample: str = "bicubic"
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    max_noise_level: int = 0
    crop_px: int = 0

    def validate(self) -> None:
        check_choice("task.kind", self.kind, TASKS)
        check_int("task.scale", self.scale, 2, MAX_SCALE)
        check_choice("task.downsample", self.downsample, DOWNSAMPLE_MODES)
        check_float("task.blur_sigma", self.blur_sigma, 0.0, 100.0)
        check_float("task.noise_std", self.noise_std, 0.0, 10.0)
        check_int("task.max_noise_level", self.max_noise_level, 0, MAX_TRAIN_TIMESTEPS)
        check_int("task.crop_px", self.crop_px, 0, MAX_RESOLUTION_PX)
        if self.crop_px and self.kind == "generate":
            raise ConfigError("task.crop_px applies to task.kind 'super-resolution' only; leave it 0 (or unset) "
                              "for 'generate'")  # fmt: skip


S = TypeVar("S", bound="SectionedConfig")


class SectionedConfig:
    """The methods of a whole run's config: a dataclass whose fields are sections (dataclasses with
    ``validate()``). Every training config (pixel, latent, autoencoder, LoRA) derives from it, so they read,
    write and check their sections in one way; ``WHAT`` names the config in messages."""

    WHAT: ClassVar[str] = "a config"

    def validate(self: S) -> S:
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        for f in fields(self):  # type: ignore[arg-type]  # every subclass is a dataclass
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return sections_to_dict(self)

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        """Build from nested dicts (a parsed JSON/TOML file, a checkpoint's config.json); a missing section or
        key takes this class's default, unknown sections and keys are errors."""
        return sections_from_dict(cls, d, what=cls.WHAT)

    def replace(self: S, **sections: dict[str, Any]) -> S:
        """A copy with some fields of some sections replaced: ``cfg.replace(run={"max_steps": 10})``."""
        return replace_sections(self, sections)

    @classmethod
    def from_file_data(cls: type[S], data: Any, path: str | os.PathLike) -> S:
        """``from_dict`` of the parsed contents of the config file ``path`` (named in the message of a value of
        the wrong type)."""
        try:
            return cls.from_dict(data)
        except TypeError as e:  # a value of the wrong type reaching a dataclass
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def load(cls: type[S], path: str | os.PathLike) -> S:
        """Read from a ``.json`` or ``.toml`` file."""
        return cls.from_file_data(read_config_file(path), path)


@dataclass
class TrainConfig(SectionedConfig):
    """The whole training configuration (every section above)."""

    WHAT = "a training config"  # in messages

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


C = TypeVar("C")


def sections_from_dict(cls: type[C], d: Any, *, what: str) -> C:
    """``cls`` (a dataclass whose fields are config sections with ``validate()``) from nested dicts: each
    section starts from ``cls()``'s default section, so a config class with its own section defaults keeps
    them; unknown sections and keys are errors (a typo must not silently train with defaults). ``what`` names
    the config in messages. Returns the validated config."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a table/object, got {type(d).__name__}")
    defaults = cls()
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names), key=str)
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; known sections: {sorted(names)}")
    parts = {}
    for name in names:
        section = d.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"config section [{name}] must be a table/object, got {section!r}")
        base = getattr(defaults, name)
        known = {f.name for f in fields(base)}
        bad = sorted(set(section) - known, key=str)
        if bad:
            raise ConfigError(f"unknown keys {bad} in config section [{name}]; known keys: {sorted(known)}")
        values = dict(section)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        parts[name] = dataclasses.replace(base, **values)
    return cls(**parts).validate()


def sections_to_dict(config: Any) -> dict[str, Any]:
    """A sectioned config as nested JSON-ready dicts (AdamW's betas as a list)."""
    d = dataclasses.asdict(config)
    if "optim" in d:
        d["optim"]["betas"] = list(config.optim.betas)
    return d


def replace_sections(config: C, sections: dict[str, dict[str, Any]]) -> C:
    """A copy of ``config`` with some fields of some sections replaced, validated."""
    d = config.to_dict()
    for name, values in sections.items():
        if name not in d:
            raise ConfigError(f"unknown config section {name!r}; known sections: {sorted(d)}")
        d[name].update(values)
    return type(config).from_dict(d)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The nested dicts of a ``.json`` or ``.toml`` config file (ConfigError naming the file when it is
    missing, unreadable or of another kind)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ConfigError("reading TOML configs on Python 3.10 needs the 'tomli' package") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    raise ConfigError(f"{path}: config files must end in .json or .toml")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training config from a ``.json`` or ``.toml`` file."""
    return TrainConfig.load(path)
