"""``diffusekit upscale``: make images four times larger with the Stable Diffusion x4 upscaler.

Inputs are image files or folders of them; every input is checked (it exists, it is an image, its size) and
the output folder is made writable before the model loads. Each output is a PNG written through the same
numbered writer (``io.png.PngWriter``: atomic, never over an existing file) and with the same metadata
(``pipelines.recipe.to_metadata``: the settings, the input's hash, the model's fingerprint) as txt2img's.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffusekit.cli.generate import _seed as parse_seed
from diffusekit.cli.generate import load_model
from diffusekit.errors import ConfigError
from diffusekit.io.fingerprint import file_sha256, model_fingerprint
from diffusekit.io.images import MAX_IMAGE_PIXELS, read_image, to_pil
from diffusekit.io.png import PngWriter
from diffusekit.limits import check_float, check_int
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.recipe import (
    DEFAULTS,
    DTYPES,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    SAMPLER_NAMES,
    Recipe,
    check_sampler,
    check_text,
    png_text,
    to_metadata,
)
from diffusekit.pipelines.upscale import DEFAULT_NOISE_LEVEL, MAX_UNTILED_PIXELS, StableDiffusionUpscaler, Upscale
from diffusekit.runtime.policy import pick_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEFAULT_STEPS, DEFAULT_GUIDANCE = 75, 9.0  # the reference pipeline's defaults
DEFAULT_TILE = 128  # low-resolution pixels per tile side; smaller inputs run in one piece
MAX_TILE = math.isqrt(MAX_UNTILED_PIXELS)  # a tile is one untiled pass
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
    """The validated options of one run."""

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


def settings_from_args(args: argparse.Namespace, n_inputs: int) -> Settings:
    """Every option checked, with messages naming it, before anything is loaded."""
    seed = parse_seed(args.seed)
    if seed + n_inputs - 1 > MAX_SEED:
        raise ConfigError(f"--seed {seed} + {n_inputs} images exceeds the largest seed {MAX_SEED}")
    tile = DEFAULT_TILE if args.tile is None else check_int("--tile", args.tile, 0, MAX_TILE)
    if args.tile_overlap is not None:
        if not tile:
            raise ConfigError("--tile-overlap needs tiling; drop it or give --tile N (N > 0)")
        check_int("--tile-overlap", args.tile_overlap, 0, tile - 1)
    eta = None if args.eta is None else check_float("--eta", args.eta, 0.0, 1.0)
    return Settings(
        prompt=check_text("--prompt", args.prompt if args.prompt is not None else ""),
        negative=check_text("--negative", args.negative if args.negative is not None else ""),
        noise_level=None if args.noise_level is None else check_int("--noise-level", args.noise_level, 0, 1 << 20),
        steps=check_int("--steps", DEFAULT_STEPS if args.steps is None else args.steps, 1, MAX_STEPS),
        guidance=check_float(
            "--guidance", DEFAULT_GUIDANCE if args.guidance is None else args.guidance, 0.0, MAX_GUIDANCE
        ),  # fmt: skip
        sampler=check_sampler("--sampler", args.sampler),
        eta=eta,
        seed=seed,
        tile=tile or None,
        tile_overlap=args.tile_overlap,
        scale=None if args.scale is None else check_int("--scale", args.scale, 1, 64),
        dtype=args.dtype or DEFAULTS["dtype"],
    )


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
    if not isinstance(sd, StableDiffusionUpscaler):  # load_model(upscaler=True) refuses the others first
        raise ConfigError(f"--model {model} is not an x4 upscaler")
    if settings.scale is not None and settings.scale != sd.scale:
        raise ConfigError(f"--scale {settings.scale}: this model upscales by {sd.scale} only")
    level = DEFAULT_NOISE_LEVEL if settings.noise_level is None else settings.noise_level
    if level > sd.max_noise_level:
        raise ConfigError(f"--noise-level must be in [0, {sd.max_noise_level}] for this model (its max_noise_level), "
                          f"got {level}")  # fmt: skip
    multiple = sd.input_multiple
    for name, value in (("--tile", settings.tile), ("--tile-overlap", settings.tile_overlap)):
        if value is not None and value % multiple:
            raise ConfigError(f"{name} must be a multiple of {multiple} (this model's U-Net factor), got {value}")
    if settings.tile is not None and settings.tile_overlap is not None and settings.tile_overlap >= settings.tile:
        raise ConfigError(f"--tile-overlap must be smaller than --tile ({settings.tile}), got {settings.tile_overlap}")
    return sd, level


def run_upscale(args: argparse.Namespace) -> int:
    """``diffusekit upscale``."""
    if args.model is None:
        raise ConfigError("--model FOLDER is required (an x4 upscaler model folder)")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder the PNGs are written to)")
    inputs = find_inputs(list(args.inputs or []))
    settings = settings_from_args(args, len(inputs))
    check_untiled_size(inputs, settings)
    out = Path(args.out)
    writer = PngWriter(out, where=f"--out {out}")
    writer.prepare()  # a folder that cannot be written fails now, not after the images are made
    written: list[Path] = []
    try:
        device = pick_device(args.device or "auto")
        model = str(Path(args.model).absolute())
        if not args.quiet:
            print(f"loading {model}", file=sys.stderr)
        sd, level = check_model(
            load_model(model, None, allow_pickle=False, device=device, dtype=DTYPES[settings.dtype], upscaler=True),
            model,
            settings,
        )
        sampler = settings.sampler or sd.sampler_config.sampler
        if settings.eta is not None and sampler != "ddim":
            raise ConfigError(f"--eta applies to the ddim sampler only; this run uses {sampler} (add --sampler ddim)")
        provenance = {"device": str(device), "batch_size": 1, **model_fingerprint(model)}
        for i, item in enumerate(inputs):
            written.append(_upscale_one(sd, item, settings, level, sampler, settings.seed + i, model, provenance,
                                        writer, quiet=bool(args.quiet)))  # fmt: skip
            print(written[-1], flush=True)
    finally:
        if not written:
            writer.discard()  # a failed run leaves no empty folder behind
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
                    model=model, tokenizer=None, image=str(item.path.absolute()), mask=None, dtype=s.dtype)  # fmt: skip
    try:
        image_hash = file_sha256(item.path)
    except OSError as e:
        raise ConfigError(f"INPUT {item.path}: cannot be read ({e.strerror or e})") from None
    meta = to_metadata(recipe, width=width, height=height, sampler=sampler,
                       provenance={**provenance, "image_sha256": image_hash, "noise_level": level,
                                   "tile": tile, "input_width": w, "input_height": h})  # fmt: skip
    return writer.write(to_pil(result.images)[0], seed, png_text(meta))


_DESCRIPTION = """\
Make images four times larger with the Stable Diffusion x4 upscaler (a latent diffusion model that
redraws a noised copy of the input at four times its size, guided by an optional text prompt).

Each INPUT is an image file or a folder (its image files, not its subfolders). Any image mode is read:
alpha channels are dropped, palette, greyscale and 16-bit images are converted to RGB (each conversion is
reported). Sides that are not multiples of the model's factor are padded by repeating the edge and the
result is cropped back to exactly 4 x the input. Inputs larger than --tile pixels on a side are upscaled
in overlapping tiles whose predictions are blended at every step, so no seams show.
"""

_EPILOG = """\
Output: one PNG per input in --out, named NNNNN-SEED.png with the next free number (existing files are never
overwritten), carrying the settings, the input file's SHA-256 and the model's fingerprint in its metadata.
Input i of a run uses seed --seed + i. The written paths go to stdout, one per line; progress to stderr.

examples:
  diffusekit upscale --model ./stable-diffusion-x4-upscaler photo.png --out big/
  diffusekit upscale --model ./stable-diffusion-x4-upscaler thumbnails/ --prompt "a sharp photo" \\
      --negative "blurry" --noise-level 40 --steps 50 --out big/
  diffusekit upscale --model ./stable-diffusion-x4-upscaler scan.png --tile 96 --tile-overlap 32 --out big/

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
                       "low_res_scheduler/)")  # fmt: skip
    model.add_argument(
        "--device",
        metavar="DEVICE",
        help="where to run: auto (default: cuda if available, else cpu), cpu, cuda, cuda:N",
    )
    model.add_argument(
        "--dtype", choices=list(DTYPES), help="network precision (default float32; the VAE always runs in float32)"
    )

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
        "--out", metavar="DIR", help="folder for the PNGs (created if needed); existing files are never overwritten"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar or messages; only the written paths")
    p.set_defaults(run=run_upscale)
    # let '-5' through as a value, so '--noise-level -5' gets the check's own message instead of argparse's
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\.?\d")


__all__ = ["add_parser", "find_inputs", "run_upscale"]
