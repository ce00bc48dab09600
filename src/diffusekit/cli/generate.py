"""``diffusekit txt2img | img2img | inpaint``: generate images with a Stable Diffusion model.

Every PNG carries the settings it was made with in two text chunks: ``diffusekit`` (one JSON object, read
back by ``--replay``) and ``parameters`` (the same in a human-readable form, as other SD tools write it).
Image i of a run uses seed ``--seed + i`` through its own random generator, and images are generated one
per network batch by default, so ``--replay`` of any one image reproduces it bit for bit on the same
machine, device and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

from diffusekit.errors import ConfigError, DiffusekitError, OutputError, WeightsError
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.samplers.config import ALIASES, SAMPLERS

MODES = ("txt2img", "img2img", "inpaint")
# the names users type (the brief's spellings first), each mapped to our sampler name
SAMPLER_NAMES = {"dpm++2m": "dpmpp_2m", "euler": "euler", "euler-a": "euler_ancestral", "ddim": "ddim",
                 "pndm": "pndm", "ddpm": "ddpm", **ALIASES, **{s: s for s in SAMPLERS}}  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METADATA_KEY = "diffusekit"  # PNG text chunk holding the JSON settings
PARAMETERS_KEY = "parameters"  # PNG text chunk in the human-readable form other SD tools use
METADATA_FORMAT = "diffusekit-generation"
METADATA_VERSION = 1
MAX_SEED = 2**63 - 1
MAX_SIDE = 16384  # pixels; guards replays of hostile files as much as typos
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 10_000
DEFAULTS = {"steps": 25, "guidance": 7.5, "seed": 0, "n": 1, "batch_size": 1, "dtype": "float32",
            "negative": "", "strength": {"img2img": 0.6, "inpaint": 1.0}}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Settings: one image's recipe, validated the same way from the command line and from a PNG


@dataclass(frozen=True)
class Settings:
    """Everything that decides one generated image (besides the machine). ``sampler=None`` means the
    model's own sampler; ``width``/``height`` None mean the model's native size (txt2img) or the input
    image's size (img2img, inpaint)."""

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


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where} {message}")


def check_int(where: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high], else a ConfigError that names ``where`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(where, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_float(where: str, value: Any, low: float, high: float) -> float:
    """``value`` as a finite float in [low, high], else a ConfigError that names ``where`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"must be a number in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise _fail(where, f"must be in [{low}, {high}], got {value!r}")
    return float(value)


def check_text(where: str, value: Any, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(where, f"must be a string of at most {limit} characters, got {_short(value)}")
    return value


def check_sampler(where: str, value: Any) -> str | None:
    """A sampler name as users type it -> ours (None stays None: the model's own sampler)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in SAMPLER_NAMES:
        raise _fail(where, f"must be one of {', '.join(_USER_SAMPLERS)}, got {_short(value)}")
    return SAMPLER_NAMES[value]


_USER_SAMPLERS = ("dpm++2m", "euler", "euler-a", "ddim", "pndm", "ddpm")


def check_side(where: str, value: Any) -> int:
    value = check_int(where, value, 8, MAX_SIDE)
    if value % 8:
        raise _fail(where, f"must be a multiple of 8, got {value}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """``"512x768"`` (width x height) or ``"512"`` (square) -> (width, height), multiples of 8."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*(?:[xX\u00d7*]\s*(\d{1,6}))?\s*", text)
    if not m:
        raise ConfigError(f"--size must be WIDTHxHEIGHT in pixels (e.g. 512x512 or 512), got {text!r}")
    width = int(m.group(1))
    height = int(m.group(2) or m.group(1))
    return check_side("--size width", width), check_side("--size height", height)


def _short(value: Any) -> str:
    text = str(value) if isinstance(value, Exception) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(s: Settings, where: Callable[[str], str]) -> Settings:
    """Check every field; ``where(field)`` names it in messages (an option, or a field of a PNG)."""
    if not isinstance(s.mode, str) or s.mode not in MODES:
        raise _fail(where("mode"), f"must be one of {', '.join(MODES)}, got {_short(s.mode)}")
    check_text(where("prompt"), s.prompt)
    check_text(where("negative_prompt"), s.negative_prompt)
    check_int(where("seed"), s.seed, 0, MAX_SEED)
    check_int(where("steps"), s.steps, 1, MAX_STEPS)
    check_float(where("guidance"), s.guidance, 0.0, 1000.0)
    check_sampler(where("sampler"), s.sampler)
    for name in ("width", "height"):
        if getattr(s, name) is not None:
            check_side(where(name), getattr(s, name))
    if (s.width is None) != (s.height is None):
        raise _fail(where("width"), "and height must be given together")
    if s.eta is not None:
        check_float(where("eta"), s.eta, 0.0, 1.0)
        if s.sampler not in (None, "ddim"):
            raise _fail(where("eta"), f"applies to the ddim sampler only, not {s.sampler}")
    if s.mode == "txt2img":
        if s.strength is not None or s.image is not None or s.mask is not None:
            raise _fail(where("mode"), "txt2img takes no input image, mask or strength")
    else:
        check_float(where("strength"), s.strength, 0.0, 1.0)
        check_text(where("image"), s.image, 4096)
        if s.mode == "inpaint":
            check_text(where("mask"), s.mask, 4096)
    check_text(where("model"), s.model, 4096)
    if not s.model:
        raise _fail(where("model"), "must name a model folder or a .safetensors file")
    if s.tokenizer is not None:
        check_text(where("tokenizer"), s.tokenizer, 4096)
    if not isinstance(s.dtype, str) or s.dtype not in DTYPES:
        raise _fail(where("dtype"), f"must be one of {', '.join(DTYPES)}, got {_short(s.dtype)}")
    return s


# ---------------------------------------------------------------------------------------------------------
# PNG metadata


def settings_to_metadata(s: Settings, *, width: int, height: int, sampler: str, extra: dict[str, Any]) -> dict:
    """The JSON object stored in a PNG: the settings with the resolved size and sampler, plus ``extra``
    (provenance such as the diffusekit version, device and input-file hashes)."""
    from diffusekit import __version__

    data = dataclasses.asdict(s)
    data.update(width=width, height=height, sampler=sampler)
    return {"format": METADATA_FORMAT, "format_version": METADATA_VERSION, "diffusekit_version": __version__,
            **data, **extra}  # fmt: skip


def parameters_text(meta: dict[str, Any]) -> str:
    """The human-readable ``parameters`` chunk: prompt, negative prompt, then ``Key: value`` pairs."""
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", meta["sampler"]),
        ("CFG scale", meta["guidance"]),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model", Path(meta["model"]).name),
        ("Denoising strength", meta["strength"]),
        ("Eta", meta["eta"]),
        ("Mode", meta["mode"]),
        ("Version", f"diffusekit {meta['diffusekit_version']}"),
    ]
    pairs = ", ".join(f"{k}: {v}" for k, v in fields if v is not None)
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    return "\n".join([*lines, pairs])


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``diffusekit`` JSON object of a PNG this tool wrote; ConfigError for anything else (missing or
    unreadable file, not a PNG, no or malformed chunk) -- never a crash on a hostile file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--replay: file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ConfigError(f"--replay {path}: not a PNG image (format {im.format})")
            text = im.info.get(METADATA_KEY)
    except DiffusekitError:
        raise
    except Exception as e:  # Pillow raises many types for malformed files; all mean "unreadable"
        raise ConfigError(f"--replay {path}: not a readable PNG ({type(e).__name__}: {_short(str(e))})") from None
    if text is None:
        raise ConfigError(f"--replay {path}: the PNG has no '{METADATA_KEY}' metadata; only images written by "
                          "diffusekit txt2img/img2img/inpaint can be replayed")  # fmt: skip
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not isinstance(text, str) or len(text) > 1_000_000:
        raise ConfigError(f"--replay {path}: the '{METADATA_KEY}' metadata is not text of a sane length")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"--replay {path}: the '{METADATA_KEY}' metadata is not valid JSON ({_short(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--replay {path}: the '{METADATA_KEY}' metadata is not a JSON object")
    if data.get("format") != METADATA_FORMAT or data.get("format_version") != METADATA_VERSION:
        raise ConfigError(
            f"--replay {path}: unknown metadata format {_short(data.get('format'))} version "
            f"{_short(data.get('format_version'))}; this diffusekit reads {METADATA_FORMAT} version {METADATA_VERSION}"
        )
    return data


def settings_from_metadata(data: dict[str, Any], source: Path) -> Settings:
    """Validated :class:`Settings` from a PNG's JSON metadata; ConfigError naming the file and the field."""
    names = [f.name for f in dataclasses.fields(Settings)]
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"--replay {source}: the metadata lacks {', '.join(missing)}")
    values = {n: data[n] for n in names}
    if isinstance(values["guidance"], int) and not isinstance(values["guidance"], bool):
        values["guidance"] = float(values["guidance"])
    return validate(Settings(**values), lambda field: f"--replay {source}: field '{field}'")


class PngWriter:
    """Writes PNGs into ``folder`` as ``NNNNN-SEED.png`` with the next free index, atomically (a temp file
    linked into place) and never over an existing file."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--out {self.folder}: exists and is not a folder")
        self.next_index: int | None = None  # found on the first write, when the folder is created

    def _prepare(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.folder}: cannot create the folder ({e.strerror})") from None
        taken = [int(m.group(1)) for p in self.folder.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
        self.next_index = max(taken, default=-1) + 1

    def write(self, image: Image.Image, seed: int, text: dict[str, str]) -> Path:
        """Save ``image`` with the PNG text chunks ``text``; return the new file's path."""
        if self.next_index is None:
            self._prepare()
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=".diffusekit-", suffix=".png.tmp")
        except OSError as e:
            raise OutputError(f"--out {self.folder}: cannot create a file ({e.strerror or e})") from None
        tmp = Path(tmp_name)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(100_000):
                target = self.folder / f"{self.next_index:05d}-{seed}.png"
                self.next_index += 1
                if self._place(tmp, target):
                    return target
            raise ConfigError(f"--out {self.folder}: no free file name found")
        except OSError as e:  # a full disk, a quota, an I/O error: the temp file goes, earlier images stay
            raise OutputError(f"--out {self.folder}: could not write an image ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _place(tmp: Path, target: Path) -> bool:
        """Move ``tmp`` to ``target`` unless ``target`` exists; False if it does."""
        try:
            os.link(tmp, target)  # atomic, and fails if the name is taken
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        try:  # a file system without hard links: reserve the name, then replace the reservation
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(tmp, target)
        return True


# ---------------------------------------------------------------------------------------------------------
# Inputs and the model


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_input(path: str, option: str, mode: str, size: tuple[int, int] | None) -> Tensor:
    """An image file as a (1, C, H, W) tensor in [0, 1] (C = 3 for RGB, 1 for a mask), resized to
    ``size`` = (width, height) when given (Lanczos for images, nearest for masks)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option}: file not found: {p}")
    try:
        with Image.open(p) as im:
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size, Image.NEAREST if mode == "L" else Image.LANCZOS)
            array = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow: unreadable, truncated or oversized files
        raise ConfigError(f"{option} {p}: not a readable image ({type(e).__name__}: {_short(str(e))})") from None
    t = torch.from_numpy(array.copy()).float() / 255
    return t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available; use --device cpu")
    return device


def load_model(
    model: str, tokenizer: str | None, *, allow_pickle: bool, device: torch.device, dtype: torch.dtype
) -> StableDiffusion:
    """A diffusers-layout folder or a single checkpoint file; ``tokenizer`` replaces the folder's tokenizer
    (and is required for single files, which carry none)."""
    from diffusekit.io.single_file import load_single_file
    from diffusekit.io.text import load_tokenizer

    path = Path(model)
    if path.is_dir():
        sd = StableDiffusion.load(path, device=device, dtype=dtype)
        if tokenizer is not None:
            sd.tokenizer = load_tokenizer(tokenizer)
        return sd
    if path.is_file():
        if tokenizer is None:
            raise ConfigError(
                f"--model {path} is a single-file checkpoint, which carries no tokenizer; pass --tokenizer DIR (a "
                "folder with vocab.json and merges.txt, e.g. the tokenizer/ folder of any SD-1.x model)"
            )
        return load_single_file(path, tokenizer, allow_pickle, device=device, dtype=dtype)
    raise WeightsError(f"--model {path}: no such folder or file")


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Job:
    """What a run makes: the settings of every image (each with its own prompt and seed)."""

    images: list[Settings]
    batch_size: int
    compare_with: Path | None = None  # a replayed PNG to compare the result with


def _settings_from_args(args: argparse.Namespace, mode: str) -> Job:
    prompts = list(args.prompt or [])
    if not prompts:
        raise ConfigError("no prompt given: pass one or more PROMPT arguments (or --replay PNG)")
    if args.model is None:
        raise ConfigError("--model PATH is required (a diffusers model folder or a .safetensors file)")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder the PNGs are written to)")
    n = check_int("--n", DEFAULTS["n"] if args.n is None else args.n, 1, 10_000)
    batch_size = check_int("--batch-size", DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size,
                           1, 1024)  # fmt: skip
    seed = _seed(args.seed)
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise ConfigError(f"--seed {seed} + {len(prompts) * n} images exceeds the largest seed {MAX_SEED}")
    width, height = parse_size(args.size) if args.size is not None else (None, None)
    base = Settings(
        mode=mode,
        prompt="",
        negative_prompt=DEFAULTS["negative"] if args.negative is None else args.negative,
        seed=seed,
        steps=DEFAULTS["steps"] if args.steps is None else args.steps,
        guidance=DEFAULTS["guidance"] if args.guidance is None else args.guidance,
        sampler=check_sampler("--sampler", args.sampler),
        width=width,
        height=height,
        eta=args.eta,
        strength=_strength(args, mode),
        model=str(Path(args.model).absolute()),
        tokenizer=None if args.tokenizer is None else str(Path(args.tokenizer).absolute()),
        image=_input_path(args, "image", mode),
        mask=_input_path(args, "mask", mode),
        dtype=args.dtype or DEFAULTS["dtype"],
    )
    images = []
    for p_index, prompt in enumerate(prompts):
        for k in range(n):
            images.append(dataclasses.replace(base, prompt=prompt, seed=seed + p_index * n + k))
    for s in images:
        validate(s, _option_name)
    return Job(images, batch_size)


def _option_name(field: str) -> str:
    return {"negative_prompt": "--negative", "width": "--size", "height": "--size"}.get(field, f"--{field}")


def _seed(value: str | None) -> int:
    if value is None:
        return DEFAULTS["seed"]
    if value == "random":
        return secrets.randbelow(2**32)
    try:
        seed = int(value)
    except ValueError:
        raise ConfigError(f"--seed must be an integer in [0, {MAX_SEED}] or 'random', got {value!r}") from None
    return check_int("--seed", seed, 0, MAX_SEED)


def _strength(args: argparse.Namespace, mode: str) -> float | None:
    if mode == "txt2img":
        return None
    return DEFAULTS["strength"][mode] if args.strength is None else args.strength


def _input_path(args: argparse.Namespace, name: str, mode: str) -> str | None:
    needed = mode == "inpaint" if name == "mask" else mode != "txt2img"
    if not needed:
        return None
    value = getattr(args, name, None)
    if value is None:
        raise ConfigError(f"--{name} FILE is required for {mode}")
    return str(Path(value).absolute())


# Options that may override a replayed PNG's settings (explicitly given ones only).
_OVERRIDES = {"model": "model", "tokenizer": "tokenizer", "negative": "negative_prompt", "steps": "steps",
              "guidance": "guidance", "sampler": "sampler", "eta": "eta", "strength": "strength", "image": "image",
              "mask": "mask", "dtype": "dtype"}  # fmt: skip


def _settings_from_replay(args: argparse.Namespace, mode: str) -> Job:
    source = Path(args.replay)
    recorded = settings_from_metadata(read_png_metadata(source), source)
    if recorded.mode != mode:
        raise ConfigError(f"--replay {source} was made by 'diffusekit {recorded.mode}'; "
                          f"run 'diffusekit {recorded.mode} --replay {source}'")  # fmt: skip
    for option in ("n", "batch_size"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} cannot be combined with --replay (it makes one image)")
    changes: dict[str, Any] = {}
    for option, field in _OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            if option in ("model", "tokenizer", "image", "mask"):
                value = str(Path(value).absolute())
            if option == "sampler":
                value = check_sampler("--sampler", value)
            changes[field] = value
    if args.prompt:
        if len(args.prompt) != 1:
            raise ConfigError("--replay takes at most one PROMPT (it makes one image)")
        changes["prompt"] = args.prompt[0]
    if args.seed is not None:
        changes["seed"] = _seed(args.seed)
    if args.size is not None:
        changes["width"], changes["height"] = parse_size(args.size)
    settings = validate(dataclasses.replace(recorded, **changes), _option_name)
    # the files may have moved; any other change makes a different image, so there is nothing to compare
    same_recipe = set(changes) <= {"model", "tokenizer", "image", "mask"}
    return Job([settings], 1, compare_with=source if same_recipe else None)


def _run(args: argparse.Namespace, mode: str) -> int:
    job = _settings_from_replay(args, mode) if args.replay is not None else _settings_from_args(args, mode)
    first = job.images[0]
    out = Path(args.out) if args.out is not None else Path(args.replay).parent
    writer = PngWriter(out)
    device = pick_device(args.device or "auto")
    quiet = bool(args.quiet)
    if not quiet:
        print(f"loading {first.model}", file=sys.stderr)
    try:
        sd = load_model(first.model, first.tokenizer, allow_pickle=bool(args.allow_pickle), device=device,
                        dtype=DTYPES[first.dtype])  # fmt: skip
    except DiffusekitError as e:
        if args.replay is None:
            raise
        raise type(e)(f"--replay {args.replay}: the model it names cannot be loaded: {e}") from None
    sampler = first.sampler or sd.sampler_config.sampler
    if first.eta is not None and sampler != "ddim":
        raise ConfigError(f"--eta applies to the ddim sampler only; this run uses {sampler} (pass --sampler ddim)")
    size = _resolve_size(first, sd)
    inputs = _load_inputs(first, size)
    what = f"--size {size[0]}x{size[1]}" if size is not None else None
    if size is None:  # img2img / inpaint at the input's own size
        size = (inputs["image"].shape[3], inputs["image"].shape[2])
        what = f"--image is {size[0]}x{size[1]} pixels, but its"
    _check_size(size, sd, what)
    provenance: dict[str, Any] = {"device": str(device), "batch_size": job.batch_size}
    if first.image is not None:
        provenance["image_sha256"] = _sha256(Path(first.image))
    if first.mask is not None:
        provenance["mask_sha256"] = _sha256(Path(first.mask))
    if job.compare_with is not None:
        _warn_changed_inputs(job.compare_with, provenance, quiet)

    written = []
    for start in range(0, len(job.images), job.batch_size):
        batch = job.images[start : start + job.batch_size]
        images = _generate(sd, batch, sampler, size, inputs, show_progress=not quiet)
        for s, image in zip(batch, images):
            meta = settings_to_metadata(s, width=size[0], height=size[1], sampler=sampler, extra=provenance)
            text = {METADATA_KEY: json.dumps(meta, ensure_ascii=True, sort_keys=True),
                    PARAMETERS_KEY: parameters_text(meta)}  # fmt: skip
            path = writer.write(image, s.seed, text)
            written.append(path)
            print(path)
    if job.compare_with is not None and not quiet:
        _report_replay(job.compare_with, written[0])
    return 0


def _resolve_size(s: Settings, sd: StableDiffusion) -> tuple[int, int] | None:
    """(width, height) to generate at; None for img2img/inpaint without --size (the input's own size)."""
    if s.width is not None:
        return s.width, s.height
    if s.mode != "txt2img":
        return None
    native = (sd.unet.config.sample_size or 64) * sd.codec.downsample_factor
    return native, native


def _check_size(size: tuple[int, int], sd: StableDiffusion, what: str) -> None:
    m = math.lcm(8, sd.latent_multiple)
    if size[0] % m or size[1] % m:
        hint = "" if what.startswith("--size") else "; pass --size WxH to resize it"
        raise ConfigError(
            f"{what} width and height must be multiples of {m} for this model (VAE factor "
            f"{sd.codec.downsample_factor} x U-Net factor {sd.unet.config.downsample_factor}){hint}"
        )


def _load_inputs(s: Settings, size: tuple[int, int] | None) -> dict[str, Tensor]:
    inputs: dict[str, Tensor] = {}
    if s.image is None:
        return inputs
    image = load_input(s.image, "--image", "RGB", size)
    inputs["image"] = image
    if s.mask is not None:
        mask = load_input(s.mask, "--mask", "L", size)
        if mask.shape[2:] != image.shape[2:]:
            raise ConfigError(
                f"--mask is {mask.shape[3]}x{mask.shape[2]} but --image is {image.shape[3]}x{image.shape[2]}; "
                "they must have the same size (or pass --size to resize both)"
            )
        inputs["mask"] = mask
    return inputs


def _generate(
    sd: StableDiffusion,
    batch: list[Settings],
    sampler: str,
    size: tuple[int, int] | None,
    inputs: dict[str, Tensor],
    *,
    show_progress: bool,
) -> list[Image.Image]:
    """Generate ``batch`` (same settings but prompt and seed) and return PIL images."""
    from diffusekit.pipelines.img2img import ImageToImage
    from diffusekit.pipelines.inpaint import Inpaint
    from diffusekit.pipelines.text_to_image import TextToImage

    s = batch[0]
    common = dict(
        negative_prompt=[b.negative_prompt for b in batch],
        steps=s.steps,
        guidance_scale=s.guidance,
        sampler=sampler,
        eta=s.eta,
        generator=generators_from_seeds([b.seed for b in batch], len(batch)),
        show_progress=show_progress,
    )
    prompts = [b.prompt for b in batch]
    if s.mode == "txt2img":
        result = TextToImage(sd)(prompts, height=size[1], width=size[0], **common)
    elif s.mode == "img2img":
        image = inputs["image"].expand(len(batch), -1, -1, -1)
        result = ImageToImage(sd)(prompts, image, strength=s.strength, **common)
    else:
        image = inputs["image"].expand(len(batch), -1, -1, -1)
        mask = inputs["mask"].expand(len(batch), -1, -1, -1)
        result = Inpaint(sd)(prompts, image, mask, strength=s.strength, **common)
    pixels = (result.images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), "RGB") for p in pixels]


def _warn_changed_inputs(source: Path, provenance: dict[str, Any], quiet: bool) -> None:
    recorded = read_png_metadata(source)
    for key in ("image_sha256", "mask_sha256"):
        if key in provenance and recorded.get(key) not in (None, provenance[key]) and not quiet:
            print(f"warning: the {key.split('_')[0]} file differs from the one {source} was made from",
                  file=sys.stderr)  # fmt: skip


def _report_replay(original: Path, replayed: Path) -> None:
    with Image.open(original) as a, Image.open(replayed) as b:
        x = np.asarray(a.convert("RGB"), dtype=np.int16)
        y = np.asarray(b.convert("RGB"), dtype=np.int16)
    if x.shape == y.shape and np.array_equal(x, y):
        print(f"replay: identical to {original}", file=sys.stderr)
    else:
        diff = int(np.abs(x - y).max()) if x.shape == y.shape else "n/a (sizes differ)"
        print(f"replay: differs from {original} (largest pixel difference {diff}; a different machine, device or "
              "batch size changes the last bits)", file=sys.stderr)  # fmt: skip


def run_txt2img(args: argparse.Namespace) -> int:
    """``diffusekit txt2img``."""
    return _run(args, "txt2img")


def run_img2img(args: argparse.Namespace) -> int:
    """``diffusekit img2img``."""
    return _run(args, "img2img")


def run_inpaint(args: argparse.Namespace) -> int:
    """``diffusekit inpaint``."""
    return _run(args, "inpaint")


# ---------------------------------------------------------------------------------------------------------
# Parsers


_DESCRIPTIONS = {
    "txt2img": "Generate images from a text prompt with a Stable Diffusion 1.x/2.x model.",
    "img2img": "Redraw an input image to match a text prompt (SDEdit): the image is encoded, noised to "
    "--strength and denoised.",
    "inpaint": "Repaint the white part of --mask in --image to match a text prompt; black parts are kept. "
    "Inpainting models (9-channel U-Net) and ordinary models both work.",
}
_SHORT_HELP = {
    "txt2img": "generate images from text with a Stable Diffusion model",
    "img2img": "redraw an image to match a text prompt",
    "inpaint": "repaint the masked part of an image to match a text prompt",
}
_EXAMPLES = {
    "txt2img": """examples:
  diffusekit txt2img --model ./stable-diffusion-v1-5 "a watercolor fox in the snow" --out out/
  diffusekit txt2img --model v1-5-pruned-emaonly.safetensors --tokenizer ./sd15/tokenizer \\
      "a lighthouse at dusk" --negative "blurry, low quality" --steps 30 --sampler dpm++2m \\
      --seed 42 --n 4 --size 512x768 --out out/
  diffusekit txt2img --replay out/00003-45.png            # the same image again, bit for bit
  diffusekit txt2img --replay out/00003-45.png --steps 50  # the same recipe with more steps
""",
    "img2img": """examples:
  diffusekit img2img --model ./stable-diffusion-v1-5 "an oil painting" --image photo.png --strength 0.6 --out out/
  diffusekit img2img --replay out/00000-0.png
""",
    "inpaint": """examples:
  diffusekit inpaint --model ./stable-diffusion-inpainting "a red sofa" --image room.png --mask sofa.png --out out/
  diffusekit inpaint --replay out/00000-0.png
""",
}
_REPLAY_NOTE = """
Each PNG records its settings (prompt, negative prompt, seed, sampler, steps, guidance, size, eta,
strength, model, input files, dtype, diffusekit version) in a 'diffusekit' JSON text chunk and a readable
'parameters' chunk. --replay PNG makes that image again; options given beside --replay override the
recorded ones. Images are generated one per network batch (--batch-size 1), so a replay on the same
machine, device and dtype is identical bit for bit. The paths of the written PNGs go to stdout, one per
line; progress and messages go to stderr.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the txt2img, img2img and inpaint sub-commands."""
    for mode, run in (("txt2img", run_txt2img), ("img2img", run_img2img), ("inpaint", run_inpaint)):
        p = subparsers.add_parser(
            mode,
            help=_SHORT_HELP[mode],
            description=_DESCRIPTIONS[mode],
            epilog=_REPLAY_NOTE + "\n" + _EXAMPLES[mode],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_options(p, mode)
        p.set_defaults(run=run)


def _add_options(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="text describing the image; several prompts make --n images each")  # fmt: skip

    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="PATH",
                       help="a diffusers model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                       "scheduler/) or a single-file SD-1.x checkpoint (.safetensors)")  # fmt: skip
    model.add_argument("--tokenizer", metavar="DIR",
                       help="tokenizer folder (vocab.json + merges.txt); required with a single-file --model, "
                       "which carries none")  # fmt: skip
    model.add_argument("--allow-pickle", action="store_true",
                       help="allow a pickled .ckpt/.pt --model, read with torch.load(weights_only=True). Pickles "
                       "can run code: use only files you trust (better: 'diffusekit convert' it once). Never taken "
                       "from a replayed PNG")  # fmt: skip
    model.add_argument("--device", metavar="DEVICE",
                       help="where to run: auto (default: cuda if available, else cpu), cpu, cuda, cuda:N")
    model.add_argument("--dtype", choices=list(DTYPES),
                       help="network precision (default float32; the VAE always runs in float32)")

    gen = p.add_argument_group("generation")
    gen.add_argument("--negative", metavar="TEXT",
                     help="negative prompt: what the image should not show (default: empty)")
    gen.add_argument("--steps", type=int, metavar="N",
                     help=f"denoising steps, 1-{MAX_STEPS} (default {DEFAULTS['steps']}); img2img/inpaint run "
                     "int(N x strength) of them")  # fmt: skip
    gen.add_argument("--guidance", type=float, metavar="SCALE",
                     help=f"classifier-free guidance scale, >= 0 (default {DEFAULTS['guidance']}); 1 disables "
                     "guidance and the negative prompt")  # fmt: skip
    gen.add_argument("--sampler", choices=list(SAMPLER_NAMES), metavar="NAME",
                     help="sampler: dpm++2m, euler, euler-a, ddim, pndm (= plms) or ddpm (default: the model's "
                     "own, pndm for SD-1.x)")  # fmt: skip
    gen.add_argument("--eta", type=float, metavar="ETA",
                     help="DDIM noise, 0 (deterministic, default) to 1 (DDPM-like); ddim sampler only")
    gen.add_argument("--seed", metavar="N",
                     help=f"random seed of the first image, 0 to 2^63-1, or 'random' (default {DEFAULTS['seed']}); "
                     "image i of the run uses seed N+i")  # fmt: skip
    size_help = (
        "image size in pixels, WIDTHxHEIGHT or one number for a square; multiples of 8 and of the model's "
        "own factor (64 for SD-1.x) (default: the model's native size, 512x512 for SD-1.x)"
        if mode == "txt2img"
        else "resize the input image (and mask) to WIDTHxHEIGHT pixels first (default: keep its size, which "
        "must be a multiple of the model's factor)"
    )
    gen.add_argument("--size", metavar="WxH", help=size_help)
    gen.add_argument("--n", type=int, metavar="N", help="images per prompt (default 1)")
    gen.add_argument("--batch-size", type=int, metavar="N",
                     help="images per network batch (default 1). Larger batches are faster on a GPU but their "
                     "images replay equal only up to rounding, not bit for bit")  # fmt: skip
    if mode != "txt2img":
        gen.add_argument("--image", metavar="FILE", help="the input image (PNG, JPEG, ...; converted to RGB)")
        default = DEFAULTS["strength"][mode]
        gen.add_argument("--strength", type=float, metavar="S",
                         help=f"how much to change the image, 0-1 (default {default}): 1 ignores its content"
                         + (", lower keeps more of it" if mode == "img2img" else ""))  # fmt: skip
    if mode == "inpaint":
        gen.add_argument("--mask", metavar="FILE",
                         help="the mask, same size as --image: white (>= 50%% grey) = repaint, black = keep")

    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="folder for the PNGs (created if needed), named NNNNN-SEED.png with the next free "
                     "number; existing files are never overwritten (default with --replay: the replayed PNG's "
                     "folder)")  # fmt: skip
    out.add_argument("--replay", metavar="PNG", help="make again the image recorded in PNG's metadata (see below)")
    out.add_argument("--quiet", action="store_true", help="no progress bar or messages; only the written paths")


__all__ = [
    "PngWriter",
    "Settings",
    "add_parser",
    "load_model",
    "parse_size",
    "read_png_metadata",
    "run_img2img",
    "run_inpaint",
    "run_txt2img",
    "settings_from_metadata",
    "settings_to_metadata",
    "validate",
]
