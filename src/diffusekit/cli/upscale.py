"""``diffusekit upscale``: make images four times larger with the Stable Diffusion x4 upscaler.

Inputs are image files or folders of them; every input is checked (it exists, it is an image, its size) and
the output folder is made writable before the model loads. Each output is a PNG written through the same
numbered writer (``io.png.PngWriter``: atomic, never over an existing file) and with the same metadata
(``pipelines.recipe.to_metadata``: the settings, the input's hash, the model's fingerprint) as txt2img's.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from diffusekit.cli.common import load_model, lora_options, parse_seed, replay_loras, report_replay, write_upscaled
from diffusekit.cli.upscale_pixels import is_pixel_sr_model, run_pixel_upscale
from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.fingerprint import model_fingerprint
from diffusekit.io.images import MAX_IMAGE_PIXELS, read_image
from diffusekit.io.png import PngWriter
from diffusekit.limits import check_float, check_int
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.recipe import (
    AUTO_DTYPE_HELP,
    DEFAULTS,
    DTYPES,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    SAMPLER_NAMES,
    Lora,
    Recipe,
    apply_loras,
    check_lora_files,
    check_sampler,
    check_text,
    chosen_dtype,
    loras_from_json,
    read_png_metadata,
)
from diffusekit.pipelines.upscale import (
    DEFAULT_NOISE_LEVEL,
    MAX_TILE,
    MAX_UNTILED_PIXELS,
    StableDiffusionUpscaler,
    Upscale,
)
from diffusekit.runtime.policy import pick_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_STEPS, DEFAULT_GUIDANCE = 75, 9.0  # the reference pipeline's defaults
DEFAULT_TILE = 128  # low-resolution pixels per tile side; smaller inputs run in one piece
MAX_INPUTS = 100_000
# what read_image does to each PIL mode that is not plain RGB, said once per input
_CONVERSIONS = {
    "RGBA": "its alpha channel is dropped",
    "LA": "greyscale with alpha: the grey is repeated to RGB and the alpha dropped",
    "PA": "a palette image with alpha: the palette is applied and the alpha dropped",
    "P": "a palette image: the palette is applied",
    "L": "greyscale: the grey is repeated to RGB",
    "1": "black and white: repeated to RGB",
    "CMYK": "CMYK: converted to RGB",
    "I;16": "16-bit greyscale: scaled by 65535 and repeated to RGB",
    "I;16B": "16-bit greyscale: scaled by 65535 and repeated to RGB",
    "I;16L": "16-bit greyscale: scaled by 65535 and repeated to RGB",
    "I": "32-bit integer greyscale: read as 16-bit (scaled by 65535) and repeated to RGB",
    "F": "32-bit float greyscale: read as values in [0, 1] and repeated to RGB",
}


@dataclass(frozen=True)
class Input:
    """One image to upscale: its path, PIL mode and size (read from the header)."""

    path: Path
    mode: str
    width: int
    height: int


def find_inputs(values: list[str]) -> list[Input]:
    """The images named by INPUT arguments: files, and the image files (by suffix, sorted) directly inside
    folders. Every one is opened (header only) so that a missing, unreadable or oversized input is an error
    naming it before the model loads."""
    if not values:
        raise ConfigError("no INPUT given: pass one or more image files or folders")
    paths: list[Path] = []
    for value in values:
        p = Path(value)
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.suffix.lower() in IMAGE_SUFFIXES and c.is_file())
            if not found:
                raise ConfigError(f"INPUT {p}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif p.exists() or p.is_symlink():
            raise ConfigError(f"INPUT {p}: not an image file or folder (a broken link or a special file)")
        else:
            raise ConfigError(f"INPUT {p}: no such file or folder")
    check_int("the number of INPUT images", len(paths), 1, MAX_INPUTS)
    return [_probe(p) for p in paths]


def _probe(path: Path) -> Input:
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except Exception as e:  # Pillow raises many types for files that are no images
        raise ConfigError(f"INPUT {path}: not a readable image ({type(e).__name__}: {str(e)[:80]})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ConfigError(f"INPUT {path}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS} allowed")
    return Input(path, mode, width, height)


@dataclass(frozen=True)
class Settings:
    """The validated options of one run; ``name`` turns an option into the words messages use for it."""

    prompt: str
    negative: str
    noise_level: int | None  # checked against the model once it is loaded
    steps: int
    guidance: float
    sampler: str | None
    eta: float | None
    seed: int
    tile: int | None  # None: never tile
    tile_overlap: int | None
    scale: int | None
    dtype: str
    name: Callable[[str], str] = field(default=str, compare=False)
    loras: tuple[Lora, ...] = ()  # LoRA files on the upscaler's U-Net and text encoder


def settings_from_args(args: argparse.Namespace, n_inputs: int, name: Callable[[str], str] = str) -> Settings:
    """Every option checked, with messages naming it as ``name("--option")``, before anything is loaded."""
    seed = parse_seed(None if args.seed is None else str(args.seed))
    if seed + n_inputs - 1 > MAX_SEED:
        raise ConfigError(f"{name('--seed')} {seed} + {n_inputs} images exceeds the largest seed {MAX_SEED}")
    tile = DEFAULT_TILE if args.tile is None else check_int(name("--tile"), args.tile, 0, MAX_TILE)
    if args.tile_overlap is not None:
        if not tile:
            raise ConfigError(f"{name('--tile-overlap')} needs tiling; drop it or give --tile N (N > 0)")
        check_int(name("--tile-overlap"), args.tile_overlap, 0, tile - 1)
    level = args.noise_level
    return Settings(
        prompt=check_text(name("--prompt"), args.prompt if args.prompt is not None else ""),
        negative=check_text(name("--negative"), args.negative if args.negative is not None else ""),
        noise_level=None if level is None else check_int(name("--noise-level"), level, 0, 1 << 20),
        steps=check_int(name("--steps"), DEFAULT_STEPS if args.steps is None else args.steps, 1, MAX_STEPS),
        guidance=check_float(
            name("--guidance"), DEFAULT_GUIDANCE if args.guidance is None else args.guidance, 0.0, MAX_GUIDANCE
        ),  # fmt: skip
        sampler=check_sampler(name("--sampler"), args.sampler),
        eta=None if args.eta is None else check_float(name("--eta"), args.eta, 0.0, 1.0),
        seed=seed,
        tile=tile or None,
        tile_overlap=args.tile_overlap,
        scale=None if args.scale is None else check_int(name("--scale"), args.scale, 1, 64),
        dtype=_dtype(name("--dtype"), chosen_dtype(args.dtype, pick_device(args.device or "auto"))),
        name=name,
    )


def _dtype(where: str, value: object) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise ConfigError(f"{where} must be one of {', '.join(DTYPES)}, got {str(value)[:40]!r}")
    return value


def check_untiled_size(inputs: list[Input], settings: Settings) -> None:
    """With tiling off, an input too large for one pass is an error naming --tile (before the model loads)."""
    if settings.tile is not None:
        return
    for item in inputs:
        if item.width * item.height > MAX_UNTILED_PIXELS:
            raise ConfigError(f"INPUT {item.path} is {item.width}x{item.height} pixels, too large to upscale in one "
                              f"piece (at most {MAX_UNTILED_PIXELS} pixels); drop --tile 0 or give --tile "
                              f"{DEFAULT_TILE}")  # fmt: skip


def check_model(sd: object, model: str, settings: Settings) -> tuple[StableDiffusionUpscaler, int]:
    """The loaded model is an x4 upscaler that fits the options: --scale and --noise-level in its range."""
    name = settings.name
    if not isinstance(sd, StableDiffusionUpscaler):  # load_model(upscaler=True) refuses the others first
        raise ConfigError(f"--model {model} is not an x4 upscaler")
    if settings.scale is not None and settings.scale != sd.scale:
        raise ConfigError(f"{name('--scale')} {settings.scale}: this model upscales by {sd.scale} only")
    level = DEFAULT_NOISE_LEVEL if settings.noise_level is None else settings.noise_level
    if level > sd.max_noise_level:
        raise ConfigError(f"{name('--noise-level')} must be in [0, {sd.max_noise_level}] for this model (its "
                          f"max_noise_level), got {level}")  # fmt: skip
    multiple = sd.input_multiple
    for option, value in (("--tile", settings.tile), ("--tile-overlap", settings.tile_overlap)):
        if value is not None and value % multiple:
            raise ConfigError(f"{name(option)} must be a multiple of {multiple} (this model's U-Net factor), "
                              f"got {value}")  # fmt: skip
    return sd, level


@dataclass
class Job:
    """What a run makes: the inputs, the settings, the model, where the PNGs go, and (for --replay) the PNG
    whose pixels the one output should equal."""

    inputs: list[Input]
    settings: Settings
    model: str
    out: Path
    compare_with: Path | None = None


def job_from_args(args: argparse.Namespace) -> Job:
    if args.model is None:
        raise ConfigError("--model FOLDER is required (an x4 upscaler model folder or a super-resolution run)")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder the PNGs are written to)")
    inputs = find_inputs(list(args.inputs or []))
    loras = tuple(Lora(path, 1.0 if weight is None else weight) for path, weight in lora_options(args))
    settings = dataclasses.replace(settings_from_args(args, len(inputs)), loras=loras)
    return Job(inputs, settings, str(Path(args.model).absolute()), Path(args.out))


# metadata fields a replay reads -> the option that overrides each
_REPLAYED = {"prompt": "--prompt", "negative_prompt": "--negative", "noise_level": "--noise-level",
             "steps": "--steps", "guidance": "--guidance", "sampler": "--sampler", "eta": "--eta", "seed": "--seed",
             "tile": "--tile", "tile_overlap": "--tile-overlap", "dtype": "--dtype"}  # fmt: skip


def job_from_replay(args: argparse.Namespace) -> Job:
    """The run recorded in a PNG's metadata (``--replay``), with the options given beside it overriding."""
    source = Path(args.replay)
    where = f"--replay {source}"
    data = read_png_metadata(source)
    mode = data.get("mode")
    if mode != "upscale":
        raise ConfigError(f"{where} was made by 'diffusekit {str(mode)[:20]}'; run 'diffusekit {str(mode)[:20]} "
                          f"--replay {source}'")  # fmt: skip
    missing = [f for f in (*_REPLAYED, "model", "image") if f not in data and f != "tile_overlap"]
    if missing:
        raise ConfigError(f"{where}: the metadata lacks {', '.join(missing)}")
    if len(args.inputs or []) > 1:
        raise ConfigError("--replay takes at most one INPUT (it makes one image)")
    given = {option for option in _REPLAYED.values() if getattr(args, _dest(option)) is not None}
    fields = {option: f for f, option in _REPLAYED.items()}
    merged = argparse.Namespace(**vars(args))
    for f, option in _REPLAYED.items():
        if option not in given:
            setattr(merged, _dest(option), data.get(f))
    if "--tile" not in given and data["tile"] is None:
        merged.tile = 0  # the image was made in one piece
    if "--sampler" in given and args.sampler != "ddim" and "--eta" not in given:
        merged.eta = None  # the recorded DDIM eta means nothing to another sampler

    def name(option: str) -> str:  # an option the user gave, or the field of the PNG
        return option if option in given or option not in fields else f"{where}: field '{fields[option]}'"

    for f in ("model", "image"):
        if not isinstance(data[f], str) or not data[f]:
            raise ConfigError(f"{where}: field '{f}' must be a path, got {str(data[f])[:40]!r}")
    model = str(Path(args.model).absolute()) if args.model is not None else data["model"]
    inputs = find_inputs(list(args.inputs) if args.inputs else [data["image"]])
    recorded = loras_from_json(f"{where}: field 'loras'", data.get("loras", []))  # none before metadata version 2
    loras, notes = replay_loras(recorded, lora_options(args))
    for note in notes if not args.quiet else ():
        print(f"note: {note}", file=sys.stderr)
    settings = dataclasses.replace(settings_from_args(merged, 1, name), loras=loras)
    out = Path(args.out) if args.out is not None else source.parent
    # the files may have moved (--model, INPUT, --lora); any other option makes a different image
    same_loras = [(x.name, x.weight, x.sha256) for x in loras] == [(x.name, x.weight, x.sha256) for x in recorded]
    return Job(inputs, settings, model, out, compare_with=None if given or not same_loras else source)


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def run_upscale(args: argparse.Namespace) -> int:
    """``diffusekit upscale``."""
    job = job_from_replay(args) if args.replay is not None else job_from_args(args)
    settings, model = job.settings, job.model
    if is_pixel_sr_model(model):  # trained by 'diffusekit train --task super-resolution'
        return run_pixel_upscale(args, job)
    check_untiled_size(job.inputs, settings)
    writer = PngWriter(job.out, where=f"--out {job.out}")
    writer.prepare()  # a folder that cannot be written fails now, not after the images are made
    written: list[Path] = []
    try:
        device = pick_device(args.device or "auto")
        lora_where = "--lora" if args.lora or args.replay is None else f"--replay {args.replay}: field 'loras'"
        loras = check_lora_files(settings.loras, lambda _: lora_where)  # before the model loads
        if not args.quiet:
            print(f"loading {model}", file=sys.stderr)
        try:
            loaded = load_model(model, None, allow_pickle=False, device=device, dtype=DTYPES[settings.dtype],
                                upscaler=True)  # fmt: skip
        except DiffusekitError as e:
            if args.replay is None:
                raise
            raise type(e)(f"--replay {args.replay}: the model it names cannot be loaded: {e}") from None
        sd, level = check_model(loaded, model, settings)
        apply_loras(sd, loras, lambda _: lora_where, verify=False)
        settings = dataclasses.replace(settings, loras=loras)  # recorded with their hashes
        sampler = settings.sampler or sd.sampler_config.sampler
        if settings.eta is not None and sampler != "ddim":
            raise ConfigError(f"{settings.name('--eta')} applies to the ddim sampler only; this run uses {sampler} "
                              "(add --sampler ddim)")  # fmt: skip
        provenance = {"device": str(device), "batch_size": 1, **model_fingerprint(model)}
        for i, item in enumerate(job.inputs):
            written.append(_upscale_one(sd, item, settings, level, sampler, settings.seed + i, model, provenance,
                                        writer, quiet=bool(args.quiet)))  # fmt: skip
            print(written[-1], flush=True)
    finally:
        if not written:
            writer.discard()  # a failed run leaves no empty folder behind
    if job.compare_with is not None and not args.quiet:
        report_replay(job.compare_with, written[0], provenance)
    return 0


def _upscale_one(
    sd: StableDiffusionUpscaler, item: Input, s: Settings, level: int, sampler: str, seed: int, model: str,
    provenance: dict[str, Any], writer: PngWriter, *, quiet: bool,
) -> Path:  # fmt: skip
    if not quiet:
        note = f" ({item.mode}, {_CONVERSIONS[item.mode]})" if item.mode in _CONVERSIONS else ""
        print(f"upscaling {item.path}{note}", file=sys.stderr)
    image = read_image(item.path, "RGB", option="INPUT")[None]  # (1, 3, h, w) in [0, 1], any PIL mode
    h, w = image.shape[2:]
    tile = s.tile if s.tile is not None and max(h, w) > s.tile else None
    result = Upscale(sd)(
        s.prompt, image, negative_prompt=s.negative, noise_level=level, steps=s.steps, guidance_scale=s.guidance,
        sampler=sampler, eta=s.eta, generator=generators_from_seeds([seed], 1), tile=tile,
        tile_overlap=s.tile_overlap if tile else None, show_progress=not quiet,
    )  # fmt: skip
    height, width = result.images.shape[2:]
    recipe = Recipe(mode="upscale", prompt=s.prompt, negative_prompt=s.negative, seed=seed, steps=s.steps,
                    guidance=s.guidance, sampler=sampler, width=width, height=height, eta=s.eta, strength=None,
                    model=model, tokenizer=None, image=str(item.path.absolute()), mask=None, dtype=s.dtype,
                    loras=s.loras)  # fmt: skip
    return write_upscaled(writer, result.images, recipe, item.path, provenance, noise_level=level, tile=tile,
                          tile_overlap=s.tile_overlap if tile else None, input_width=w, input_height=h)


_DESCRIPTION = """\
Make images larger with a diffusion upscaler: the Stable Diffusion x4 upscaler (a latent diffusion model
that redraws a noised copy of the input at four times its size, guided by an optional text prompt), or a
pixel-space upscaler trained with 'diffusekit train --task super-resolution --scale N' (SR3, Saharia et al.
2021: it upscales by the scale it was trained for; --prompt, --negative and --guidance do not apply to it).

Each INPUT is an image file or a folder (its image files, not its subfolders). Any image mode is read:
alpha channels are dropped, palette, greyscale and 16-bit images are converted to RGB (each conversion is
reported). Sides that are not multiples of the model's factor are padded by repeating the edge and the
result is cropped back to exactly scale x the input. Inputs larger than --tile pixels on a side are upscaled
in overlapping tiles whose predictions are blended at every step, so no seams show.
"""

_EPILOG = """\
Output: one PNG per input in --out, named NNNNN-SEED.png with the next free number (existing files are never
overwritten), carrying the settings, the input file's SHA-256 and the model's fingerprint in its metadata.
Input i of a run uses seed --seed + i. --replay PNG upscales again as PNG records (same input file, model and
settings; options given beside it override them) and says whether the result is identical. The written
paths go to stdout, one per line; progress to stderr.

examples:
  diffusekit upscale --model ./stable-diffusion-x4-upscaler photo.png --out big/
  diffusekit upscale --model ./stable-diffusion-x4-upscaler thumbnails/ --prompt "a sharp photo" \\
      --negative "blurry" --noise-level 40 --steps 50 --out big/
  diffusekit upscale --model ./stable-diffusion-x4-upscaler scan.png --tile 96 --tile-overlap 32 --out big/
  diffusekit upscale --replay big/00000-0.png                    # the same image again
  diffusekit upscale --replay big/00000-0.png --noise-level 60   # the same input and settings, more noise
  diffusekit upscale --model runs/sr/model small_digits/ --out big/  # a model trained with --task super-resolution

hires fix (generate small, upscale, optionally redraw at the large size):
  diffusekit txt2img --model ./stable-diffusion-v1-5 "a lighthouse at dusk" --size 256 --out small/
  diffusekit upscale --model ./stable-diffusion-x4-upscaler small/00000-0.png --prompt "a lighthouse at dusk" --out big/
  diffusekit img2img --model ./stable-diffusion-v1-5 "a lighthouse at dusk" --image big/00000-0.png \\
      --strength 0.3 --out final/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the upscale sub-command."""
    p = subparsers.add_parser("upscale", help="make images 4x larger with the Stable Diffusion x4 upscaler",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files or folders of images")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="FOLDER",
                       help="an x4 upscaler model folder in the diffusers layout (model_index.json naming "
                       "StableDiffusionUpscalePipeline, unet/, vae/, text_encoder/, tokenizer/, scheduler/, "
                       "low_res_scheduler/), or the model/ folder of a super-resolution run of "
                       "'diffusekit train'")  # fmt: skip
    model.add_argument(
        "--device",
        metavar="DEVICE",
        help="where to run: auto (default: cuda if available, else cpu), cpu, cuda, cuda:N",
    )
    model.add_argument("--dtype", choices=["auto", *DTYPES], help=AUTO_DTYPE_HELP)

    gen = p.add_argument_group("upscaling")
    gen.add_argument("--prompt", metavar="TEXT", help="what the image shows; guides the new detail (default: empty)")
    gen.add_argument("--negative", metavar="TEXT", help="what the result should not show (default: empty)")
    gen.add_argument("--noise-level", type=int, metavar="N",
                     help=f"how much noise is added to the input before it is redrawn, 0 to the model's "
                     f"max_noise_level (350 for the released model) (default {DEFAULT_NOISE_LEVEL}); higher "
                     "invents more detail and keeps less of the input")  # fmt: skip
    gen.add_argument("--steps", type=int, metavar="N", help=f"denoising steps, 1-{MAX_STEPS} (default {DEFAULT_STEPS})")
    gen.add_argument("--guidance", type=float, metavar="SCALE",
                     help=f"classifier-free guidance scale, >= 0 (default {DEFAULT_GUIDANCE}); 1 disables guidance "
                     "and the negative prompt")  # fmt: skip
    gen.add_argument("--sampler", choices=list(SAMPLER_NAMES), metavar="NAME",
                     help="sampler: dpm++2m, euler, euler-a, ddim, pndm (= plms) or ddpm (default: the model's "
                     "own, ddim for the released model)")  # fmt: skip
    gen.add_argument(
        "--eta", type=float, metavar="ETA", help="DDIM noise, 0 (deterministic, default) to 1; ddim sampler only"
    )
    gen.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                     help="attach a LoRA file made for the upscaler (kohya/A1111 or PEFT .safetensors) with WEIGHT "
                     "(default 1); repeatable; recorded with its SHA-256, which --replay checks")  # fmt: skip
    gen.add_argument("--seed", metavar="N",
                     help=f"random seed of the first input, 0 to 2^63-1, or 'random' (default {DEFAULTS['seed']}); "
                     "input i uses seed N+i")  # fmt: skip
    gen.add_argument(
        "--scale",
        type=int,
        metavar="N",
        help="the upscaling factor expected (optional): an error unless the model upscales by N",
    )
    gen.add_argument("--tile", type=int, metavar="N",
                     help=f"tile side in input pixels, a multiple of the model's factor (default {DEFAULT_TILE}); "
                     "inputs larger than this on a side are upscaled in overlapping tiles; 0 never tiles (inputs "
                     f"over {MAX_UNTILED_PIXELS} pixels are then refused)")  # fmt: skip
    gen.add_argument("--tile-overlap", type=int, metavar="N",
                     help="overlap of neighbouring tiles in input pixels, a multiple of the model's factor "
                     "(default: a quarter of --tile)")  # fmt: skip

    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the PNGs (created if needed); existing files are never overwritten "
        "(default with --replay: the replayed PNG's folder)",
    )
    out.add_argument("--replay", metavar="PNG",
                     help="upscale again as recorded in PNG's metadata (an output of this command); options given "
                     "beside it override the recorded ones, INPUT replaces the recorded input file")  # fmt: skip
    out.add_argument("--quiet", action="store_true", help="no progress bar or messages; only the written paths")
    p.set_defaults(run=run_upscale)
    # let '-5' through as a value, so '--noise-level -5' gets the check's own message instead of argparse's
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\.?\d")


__all__ = ["add_parser", "find_inputs", "run_upscale"]
