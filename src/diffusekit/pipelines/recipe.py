"""The generation recipe: everything that decides one generated image, as a validated record.

A :class:`Recipe` is built from a dict (a JSON body, a PNG's metadata, the command line's options) and
checked field by field; every message names the field in the caller's vocabulary through a ``name``
function (the command line maps ``steps`` to ``--steps``, a PNG reader to ``--replay X.png: field 'steps'``,
a JSON API to ``field 'steps'``). It serialises back to standard JSON (never NaN or Infinity), is stored in
the PNGs it makes (a ``diffusekit`` JSON text chunk and a human-readable ``parameters`` chunk, as other SD
tools write it), and runs against a loaded :class:`StableDiffusion` with :func:`resolve` and :func:`generate`.

Image i of a run gets its own generator seeded with its own seed (``generators_from_seeds``), so a replay of
one image on the same machine, device and dtype reproduces it bit for bit. A replay that differs says why
(:func:`replay_differences`): the model's files, the input images, the device or the batch it was made in.

Samplers are named as users type them, the popular web UI's names included (``"DPM++ 2M Karras"`` is
``dpmpp_2m`` on Karras sigmas: :mod:`diffusekit.samplers.names`). LoRA files (:class:`Lora`) are part of the
recipe: :func:`apply_loras` attaches them once per run and records each file's SHA-256, so a replay refuses
a different file under the same name. :func:`recipe_from_parameters` reads the ``parameters`` text other SD
tools write, for replaying their PNGs with a model the user names. ``guidance_interval`` limits the guidance to
noise levels lo < sigma <= hi (Kynkäänniemi et al. 2024); JSON writes it [lo, hi], an open upper end as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.limits import check_flag, check_float, check_int
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.denoise import grid_for, sampler_for
from diffusekit.pipelines.fields import MAX_PATH_CHARS, MAX_PROMPT_CHARS, Namer, check_path, check_text, json_field
from diffusekit.pipelines.fields import short as _short
from diffusekit.pipelines.png_settings import (
    FIELD_VERSIONS,
    MAX_METADATA_CHARS,
    METADATA_FORMAT,
    METADATA_KEY,
    METADATA_VERSION,
    PARAMETER_KEYS,
    PARAMETERS_KEY,
    READ_VERSIONS,
    Parameters,
    interval_from_json,
    interval_to_json,
    parameters_text,
    read_png_metadata,
    read_png_settings,
    recipe_from_parameters,
)
from diffusekit.pipelines.recipe_loras import (
    MAX_LORAS,
    Lora,
    apply_loras,
    check_lora_files,
    check_loras,
    loras_from_json,
)
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.runtime.policy import default_dtype
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import ALIASES, SAMPLERS, SamplerConfig
from diffusekit.samplers.names import KARRAS_SAMPLERS, WEB_UI, check_karras, lookup, sampler_and_grid, web_ui_name

MODES = ("txt2img", "img2img", "inpaint")
USER_SAMPLERS = (*(n.name for n in WEB_UI), *SAMPLERS)  # as messages list them
# every spelling accepted as written -> our sampler (case-insensitive forms: samplers.names.lookup)
SAMPLER_NAMES = {**{s: s for s in SAMPLERS}, **ALIASES,
                 **{spelling: n.sampler for n in WEB_UI for spelling in (n.name, *n.aliases)}}  # fmt: skip
LCM_GUIDANCE = 1.0  # the guidance latent consistency models are distilled for (Luo et al. 2023, sec. 4.2)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SEED = 2**63 - 1
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 8, 16384, 4  # pixels; 4: the smallest VAE factor we train (f=4)
MAX_STEPS = 1000
MAX_GUIDANCE = 1000.0
DEFAULTS: dict[str, Any] = {"negative_prompt": "", "seed": 0, "steps": 25, "guidance": 7.5, "sampler": None,
                            "width": None, "height": None, "eta": None, "tokenizer": None, "image": None,
                            "mask": None, "dtype": "float32", "karras": None, "loras": (),
                            "guidance_interval": None}  # fmt: skip
AUTO_DTYPE_HELP = ("network precision: auto (default: bfloat16 where the device computes it natively - CUDA, CPUs "
                   "with AVX512-BF16 or AMX - else float32), float32, bfloat16, float16; the VAE always runs in "
                   "float32. The PNG records the one used, so --replay reproduces it")
DEFAULT_STRENGTH = {"txt2img": None, "img2img": 0.6, "inpaint": 1.0}


def chosen_dtype(value: str | None, device: str | torch.device) -> str:
    """The dtype name a run uses: ``value`` when given, else (None or ``auto``) bfloat16 where ``device``
    computes it natively (:func:`diffusekit.runtime.policy.default_dtype`: CUDA with bf16, CPUs with AVX512-BF16
    or AMX) and float32 elsewhere. Recipes record the chosen name (never ``auto``), so a replay runs in the
    precision of the original. ``DEFAULTS["dtype"]`` stays float32: it fills recipes written before ``auto``."""
    if value is None or value == "auto":
        return "bfloat16" if default_dtype(device) == torch.bfloat16 else "float32"
    return value


# ---------------------------------------------------------------------------------------------------------
# The record and its validation


@dataclass(frozen=True)
class Recipe:
    """Everything that decides one generated image (besides the machine). ``sampler=None`` means the
    model's own sampler; ``karras`` None its own noise-level grid, True/False Karras sigmas or not;
    ``width``/``height`` None mean the model's native size (txt2img) or the input image's size (img2img,
    inpaint). ``model``, ``tokenizer``, ``image``, ``mask`` and the ``loras``' files are paths.
    ``guidance_interval`` (lo, hi), hi possibly inf: guidance only where lo < sigma <= hi; None: every step."""

    mode: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str | None
    width: int | None
    height: int | None
    eta: float | None
    strength: float | None
    model: str
    tokenizer: str | None
    image: str | None
    mask: str | None
    dtype: str
    karras: bool | None = None
    loras: tuple[Lora, ...] = ()
    guidance_interval: tuple[float, float] | None = None

    @classmethod
    def from_dict(
        cls, data: Any, *, name: Namer = json_field, complete: bool = False, allow_unknown: bool = False
    ) -> Recipe:
        """A validated recipe from a JSON-like dict. ``complete``: every field must be present (a PNG's
        metadata); else ``mode``, ``prompt`` and ``model`` must be, and the others take their defaults.
        Keys that are no field are refused unless ``allow_unknown`` (a PNG carries provenance beside them).
        ``sampler`` may be any accepted name (``"DPM++ 2M Karras"`` sets ``karras`` too); ``loras`` is a list
        of ``{"path", "weight", "sha256"}`` objects (weight 1 and no hash when left out); ``guidance_interval``
        [lo, hi] with hi null for an open end. Without a ``guidance`` the LCM sampler gets LCM_GUIDANCE, the
        others the default."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe must be a JSON object, got {_short(type(data).__name__)}")
        names = [f.name for f in dataclasses.fields(cls)]
        if not allow_unknown:
            unknown = sorted(str(k) for k in data if k not in names)
            if unknown:
                raise ConfigError(f"unknown {', '.join(map(name, unknown))}; the fields are {', '.join(names)}")
        required = names if complete else ["mode", "prompt", "model"]
        missing = [n for n in required if n not in data]
        if missing:
            raise ConfigError(f"missing {', '.join(map(name, missing))}")
        mode = data["mode"]
        defaults = {**DEFAULTS, "strength": DEFAULT_STRENGTH.get(mode) if isinstance(mode, str) else None}
        values = {n: data[n] if n in data else defaults[n] for n in names}
        for n in ("guidance", "eta", "strength"):  # JSON writes 7.0 as 7
            if type(values[n]) is int:
                values[n] = float(values[n])
        values["sampler"], values["karras"] = sampler_and_grid(name, values["sampler"], values["karras"])
        values["loras"] = loras_from_json(name("loras"), values["loras"])
        values["guidance_interval"] = interval_from_json(name("guidance_interval"), values["guidance_interval"])
        if "guidance" not in data and values["sampler"] == "lcm":
            values["guidance"] = LCM_GUIDANCE
        return cls(**values).validated(name)

    def validated(self, name: Namer = json_field) -> Recipe:
        """This recipe if every field is valid; else a ConfigError naming the field as ``name(field)``."""
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ConfigError(f"{name('mode')} must be one of {', '.join(MODES)}, got {_short(self.mode)}")
        check_text(name("prompt"), self.prompt)
        check_text(name("negative_prompt"), self.negative_prompt)
        check_int(name("seed"), self.seed, 0, MAX_SEED)
        check_int(name("steps"), self.steps, 1, MAX_STEPS)
        check_float(name("guidance"), self.guidance, 0.0, MAX_GUIDANCE)
        interval_from_json(name("guidance_interval"), self.guidance_interval)
        sampler = None if self.sampler is None else lookup(self.sampler, name("sampler"))[0]
        if self.karras is not None:
            check_flag(name("karras"), self.karras)
            if sampler is not None:
                check_karras(name("sampler"), sampler, self.karras)
        check_loras(name("loras"), self.loras)
        for field in ("width", "height"):
            if getattr(self, field) is not None:
                check_side(name(field), getattr(self, field))
        if (self.width is None) != (self.height is None):
            raise ConfigError(f"{name('width')} and {name('height')} must be given together")
        if self.eta is not None:
            check_float(name("eta"), self.eta, 0.0, 1.0)
            if sampler not in (None, "ddim"):
                raise ConfigError(f"{name('eta')} applies to the ddim sampler only, not {self.sampler}")
        if self.mode == "txt2img":
            for field in ("strength", "image", "mask"):
                if getattr(self, field) is not None:
                    raise ConfigError(f"{name(field)} is not used by txt2img (it takes no input image)")
        else:
            check_float(name("strength"), self.strength, 0.0, 1.0)
            if int(self.steps * self.strength) < 1:  # the rule of stable_diffusion.grid_for
                raise ConfigError(
                    f"{name('strength')} {self.strength} with {name('steps')} {self.steps} runs no denoising "
                    f"step ({name('steps')} x {name('strength')} rounds down to 0); raise {name('strength')} or "
                    f"{name('steps')}"
                )
            check_path(name("image"), self.image)
            if self.mode == "inpaint":
                check_path(name("mask"), self.mask)
            elif self.mask is not None:
                raise ConfigError(f"{name('mask')} is used by inpaint only, not by {self.mode}")
        check_path(name("model"), self.model)
        if self.tokenizer is not None:
            check_path(name("tokenizer"), self.tokenizer)
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"{name('dtype')} must be one of {', '.join(DTYPES)}, got {_short(self.dtype)}")
        return self

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` (not validated: call :meth:`validated`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict of JSON values (what :meth:`from_dict` reads back)."""
        data = dataclasses.asdict(self)
        data["loras"] = [dataclasses.asdict(lora) for lora in self.loras]
        data["guidance_interval"] = interval_to_json(self.guidance_interval)  # JSON has no infinity: null
        return data

    def to_json(self) -> str:
        """Standard JSON (never NaN or Infinity: the fields are validated finite)."""
        return json.dumps(self.to_dict(), ensure_ascii=True, sort_keys=True, allow_nan=False)


def check_sampler(where: str, value: Any) -> str | None:
    """A sampler name as users type it -> ours (None stays None: the model's own sampler), for callers that
    have no Karras grid to offer: a Karras name is refused rather than run on another grid."""
    if value is None:
        return None
    sampler, karras = lookup(value, where)
    if karras:
        plain = web_ui_name(sampler, False)
        raise ConfigError(f"{where} {value!r}: Karras sigmas are not available here; use {plain!r}")
    return sampler


def check_side(where: str, value: Any) -> int:
    """An image side in pixels: an integer in [MIN_SIDE, MAX_SIDE], a multiple of SIDE_MULTIPLE."""
    check_int(where, value, MIN_SIDE, MAX_SIDE)
    if value % SIDE_MULTIPLE:
        raise ConfigError(f"{where} must be a multiple of {SIDE_MULTIPLE}, got {value}")
    return value


SIZE_FORM = (f"WIDTHxHEIGHT in pixels (or one number for a square), each a multiple of {SIDE_MULTIPLE} from "
             f"{MIN_SIDE} to {MAX_SIDE}, e.g. 512x768")  # fmt: skip


def parse_size(text: str, where: str = "size") -> tuple[int, int]:
    """``"512x768"`` (width x height) or ``"512"`` (a square) -> (width, height); else a ConfigError naming
    ``where`` with the allowed form and bounds."""
    m = re.fullmatch(r"\s*([+-]?\d{1,9})\s*(?:[xX\u00d7*]\s*([+-]?\d{1,9}))?\s*", text)
    if not m:
        raise ConfigError(f"{where} must be {SIZE_FORM}; got {_short(text)}")
    width, height = int(m.group(1)), int(m.group(2) or m.group(1))
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIDE_MULTIPLE:
            raise ConfigError(f"{where} must be {SIZE_FORM}; got {_short(text)} ({side} is not allowed)")
    return width, height


# ---------------------------------------------------------------------------------------------------------
# PNG metadata


def to_metadata(
    recipe: Recipe, *, width: int, height: int, sampler: str, provenance: Mapping[str, Any], karras: bool | None = None
) -> dict:
    """The JSON object stored in a PNG: the recipe with the size, sampler and grid (``karras``; default the
    recipe's) it ran with, plus ``provenance`` (device, batch size, input-file hashes, model fingerprints, ...).
    The recipe's LoRAs should carry their hashes (:func:`apply_loras` returns them so)."""
    from diffusekit import __version__

    karras = recipe.karras if karras is None else karras
    data = recipe.replace(width=width, height=height, sampler=sampler, karras=karras).to_dict()
    return {"format": METADATA_FORMAT, "format_version": METADATA_VERSION, "diffusekit_version": __version__,
            **data, **provenance}  # fmt: skip


def png_text(meta: Mapping[str, Any]) -> dict[str, str]:
    """The PNG text chunks of ``meta``: the JSON object (standard JSON only) and the readable summary."""
    return {METADATA_KEY: json.dumps(meta, ensure_ascii=True, sort_keys=True, allow_nan=False),
            PARAMETERS_KEY: parameters_text(meta)}  # fmt: skip


def recipe_from_metadata(data: Mapping[str, Any], where: str) -> Recipe:
    """The validated recipe of a PNG's metadata; messages read ``{where}: field 'steps' ...``. A field added
    after the metadata's version (FIELD_VERSIONS: ``karras`` and ``loras`` in 2, ``guidance_interval`` in 3) may
    be missing and takes its default: the model's own grid, no LoRAs, guidance at every step."""
    version = data.get("format_version")
    optional = [f for f, added in FIELD_VERSIONS.items() if isinstance(version, int) and version < added]
    missing = [f.name for f in dataclasses.fields(Recipe) if f.name not in data and f.name not in optional]
    if missing:
        raise ConfigError(f"{where}: the metadata lacks {', '.join(missing)}")
    data = {**{k: DEFAULTS[k] for k in optional}, **data}
    return Recipe.from_dict(data, name=lambda field: f"{where}: field '{field}'", complete=True, allow_unknown=True)


# ---------------------------------------------------------------------------------------------------------
# Provenance: what else decides the pixels, recorded to explain a replay that differs

_CAUSES = (
    ("model_weights", "the model's weights differ from the ones that made this image"),
    ("model_config", "the model's config or tokenizer files differ from the ones that made this image"),
    ("image_sha256", "the input image file differs from the one this image was made from"),
    ("mask_sha256", "the mask file differs from the one this image was made from"),
)


def replay_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Why a replay may not reproduce a PNG: the provenance it recorded against the replay's, most decisive
    cause first (changed model files, changed inputs, another device or diffusekit version, a batch). Empty
    where nothing recorded differs (then only another machine is left)."""
    causes = [text for key, text in _CAUSES if recorded.get(key) not in (None, current.get(key))]
    if recorded.get("device") not in (None, current.get("device")):
        causes.append(f"it was made on {str(recorded['device'])[:60]}, replayed on {current.get('device')}")
    from diffusekit import __version__

    if recorded.get("diffusekit_version") not in (None, __version__):
        made_by = str(recorded["diffusekit_version"])[:60]
        causes.append(f"it was made by diffusekit {made_by}, replayed with {__version__}")
    made_with, replayed_with = recorded.get("engine") or "torch", current.get("engine") or "torch"
    if made_with != replayed_with:
        causes.append(f"it was made with --engine {str(made_with)[:20]}, replayed with --engine {replayed_with}")
    batch = recorded.get("batch_size")
    if isinstance(batch, int) and batch > 1:
        causes.append(f"it was made in a batch of {batch}; images of a batch equal the one made alone only "
                      "up to rounding")  # fmt: skip
    return causes


# ---------------------------------------------------------------------------------------------------------
# Running a recipe against a loaded pipeline


@dataclass
class Resolved:
    """A recipe made concrete for one model: the sampler and size it runs with, and its input tensors
    (``image`` (1, 3, H, W) and ``mask`` (1, 1, H, W) in [0, 1])."""

    sampler: str
    width: int
    height: int
    inputs: dict[str, Tensor]
    karras: bool = False  # whether the sampler walks Karras sigmas

    def sampler_config(self, sd: StableDiffusion) -> SamplerConfig:
        """The model's noise schedule with this sampler and grid."""
        return sd.sampler_config.with_sampler(self.sampler, karras_sigmas=self.karras)


def resolve(recipe: Recipe, sd: StableDiffusion, name: Namer = json_field) -> Resolved:
    """Check ``recipe`` against the model ``sd`` and read its input images; ConfigErrors name fields as
    ``name(field)``."""
    sampler = recipe.sampler or sd.sampler_config.sampler
    karras = sd.sampler_config.karras_sigmas if recipe.karras is None else recipe.karras
    if recipe.sampler is None and recipe.karras:
        check_karras(f"{name('karras')} (this model's own sampler is {sampler})", sampler, True)
    karras = bool(karras) and sampler in KARRAS_SAMPLERS  # other samplers walk no sigma grid
    if recipe.eta is not None and sampler != "ddim":
        raise ConfigError(f"{name('eta')} applies to the ddim sampler only; this model's own sampler is "
                          f"{sampler} (set {name('sampler')} to ddim)")  # fmt: skip
    timesteps = sd.sampler_config.num_train_timesteps
    if recipe.steps > timesteps:
        raise ConfigError(f"{name('steps')} must be at most {timesteps} for this model (its training steps), "
                          f"got {recipe.steps}")  # fmt: skip
    try:  # the sampler's own rules for its grid (a consistency model's step limit, ...), in the caller's words
        config = sampler_for(sd.sampler_config.with_sampler(sampler, karras_sigmas=karras), None, recipe.eta)
        grid_for(config, recipe.steps, recipe.strength or 1.0)
    except ConfigError as e:
        raise ConfigError(_LIBRARY_NAMES.sub(lambda m: name(_FIELDS[m.group(1)]) + " ", str(e))) from None
    multiple = math.lcm(SIDE_MULTIPLE, sd.latent_multiple)
    why = (f"for this model (VAE factor {sd.codec.downsample_factor} x U-Net factor "
           f"{sd.unet.config.downsample_factor})")  # fmt: skip
    size = (recipe.width, recipe.height) if recipe.width is not None else None
    if size is None and recipe.mode == "txt2img":
        native = (sd.unet.config.sample_size or 64) * sd.codec.downsample_factor
        size = (native, native)
    if size is not None and (size[0] % multiple or size[1] % multiple):
        raise ConfigError(f"{name('width')} {size[0]}x{size[1]}: width and height must be multiples of "
                          f"{multiple} {why}")  # fmt: skip
    inputs = load_inputs(recipe, size, name)
    if size is None:  # img2img / inpaint at the input's own size
        size = (inputs["image"].shape[3], inputs["image"].shape[2])
        if size[0] % multiple or size[1] % multiple:
            raise ConfigError(f"{name('image')} is {size[0]}x{size[1]} pixels, but its width and height must be "
                              f"multiples of {multiple} {why}; set {name('width')} to resize it")  # fmt: skip
    return Resolved(sampler, size[0], size[1], inputs, karras)


# the pipelines' parameter names (as their messages write them, ``steps=30``) -> recipe fields
_FIELDS = {"num_inference_steps": "steps", "steps": "steps", "strength": "strength", "guidance_scale": "guidance",
           "eta": "eta"}  # fmt: skip
_LIBRARY_NAMES = re.compile(r"\b(" + "|".join(_FIELDS) + r")=")


def load_inputs(recipe: Recipe, size: tuple[int, int] | None, name: Namer = json_field) -> dict[str, Tensor]:
    """The recipe's input image (and mask), resized to ``size`` = (width, height) when given."""
    from diffusekit.io.images import read_image

    inputs: dict[str, Tensor] = {}
    if recipe.image is None:
        return inputs
    for field, mode in (("image", "RGB"), ("mask", "L")):
        path = getattr(recipe, field)
        if path is None:
            continue
        t = read_image(path, mode, option=name(field))  # (C, H, W) in [0, 1], 16-bit files scaled by 65535
        if size is not None and (t.shape[2], t.shape[1]) != size:
            t = _resize(t, size, Image.NEAREST if field == "mask" else Image.LANCZOS)
        inputs[field] = t[None]
    if "mask" in inputs and inputs["mask"].shape[2:] != inputs["image"].shape[2:]:
        m, i = inputs["mask"].shape, inputs["image"].shape
        raise ConfigError(f"{name('mask')} is {m[3]}x{m[2]} but {name('image')} is {i[3]}x{i[2]}; they must have "
                          f"the same size (or set {name('width')} to resize both)")  # fmt: skip
    return inputs


def _resize(t: Tensor, size: tuple[int, int], method: int) -> Tensor:
    """Resize (C, H, W) in [0, 1] to ``size`` = (width, height), each channel as a 32-bit float image (so a
    16-bit input keeps its precision)."""
    channels = [Image.fromarray(c.numpy(), "F").resize(size, method) for c in t]
    return torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in channels])).clamp_(0, 1)


def generate(
    sd: StableDiffusion,
    batch: Sequence[Recipe],
    resolved: Resolved,
    *,
    show_progress: bool = False,
    callback: Callable[[StepInfo], None] | None = None,
) -> list[Image.Image]:
    """Generate ``batch`` (recipes equal but for prompt, negative prompt and seed; one network batch), one
    CPU generator per image seeded with its recipe's seed, and return RGB PIL images. ``callback`` gets the
    sampler's :class:`StepInfo` after every step (progress, previews; an exception it raises stops the run)."""
    from diffusekit.io.images import to_pil
    from diffusekit.pipelines.img2img import ImageToImage
    from diffusekit.pipelines.inpaint import Inpaint
    from diffusekit.pipelines.sdxl import ImageToImageXL, StableDiffusionXL, TextToImageXL
    from diffusekit.pipelines.text_to_image import TextToImage

    r = batch[0]
    if resolved.karras != sd.sampler_config.karras_sigmas:  # the same modules with the grid asked for
        sd = dataclasses.replace(sd, sampler_config=resolved.sampler_config(sd))
    common = dict(
        negative_prompt=[b.negative_prompt for b in batch],
        steps=r.steps,
        guidance_scale=r.guidance,
        guidance_interval=r.guidance_interval,
        sampler=resolved.sampler,
        eta=r.eta,
        generator=generators_from_seeds([b.seed for b in batch], len(batch)),
        show_progress=show_progress,
        callback=callback,
    )
    prompts = [b.prompt for b in batch]
    n = len(batch)
    xl = isinstance(sd, StableDiffusionXL)
    if xl and r.mode == "inpaint":
        raise ConfigError("inpainting with an SDXL model is not supported; use img2img, or an SD-1.x/2.x model")
    if r.mode == "txt2img":
        result = (TextToImageXL if xl else TextToImage)(sd)(prompts, height=resolved.height, width=resolved.width,
                                                            **common)  # fmt: skip
    elif r.mode == "img2img":
        image = resolved.inputs["image"].expand(n, -1, -1, -1)
        result = (ImageToImageXL if xl else ImageToImage)(sd)(prompts, image, strength=r.strength, **common)
    else:
        image = resolved.inputs["image"].expand(n, -1, -1, -1)
        mask = resolved.inputs["mask"].expand(n, -1, -1, -1)
        result = Inpaint(sd)(prompts, image, mask, strength=r.strength, **common)
    return to_pil(result.images)


# the recipe's own names, and those it gathers from its helper modules (callers import them from here)
__all__ = [
    "DEFAULTS", "DEFAULT_STRENGTH", "DTYPES", "LCM_GUIDANCE", "MAX_GUIDANCE", "MAX_LORAS", "MAX_METADATA_CHARS",
    "MAX_PATH_CHARS", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_STEPS", "METADATA_FORMAT", "METADATA_KEY",
    "METADATA_VERSION", "PARAMETERS_KEY", "PARAMETER_KEYS", "READ_VERSIONS", "SAMPLER_NAMES", "USER_SAMPLERS",
    "Lora", "Namer", "Parameters", "Recipe", "Resolved", "apply_loras", "check_lora_files", "check_loras",
    "check_path", "check_sampler", "check_side", "check_text", "generate", "interval_from_json", "interval_to_json",
    "json_field", "load_inputs", "loras_from_json", "parameters_text", "parse_size", "png_text",
    "read_png_metadata", "read_png_settings", "recipe_from_metadata", "recipe_from_parameters",
    "replay_differences", "resolve", "sampler_and_grid", "to_metadata"
]  # fmt: skip
