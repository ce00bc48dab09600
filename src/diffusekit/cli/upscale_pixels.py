"""``diffusekit upscale`` for pixel-space super-resolution models (SR3-style, trained by ``diffusekit train
--task super-resolution``): the options that apply to them, checked against the loaded model, and one PNG per
input with the same numbered writer, metadata and ``--replay`` as the Stable Diffusion x4 upscaler's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusekit.cli.common import write_upscaled
from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.fingerprint import model_fingerprint
from diffusekit.io.images import read_image
from diffusekit.io.png import PngWriter
from diffusekit.io.weights import read_json
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.recipe import DTYPES, Recipe
from diffusekit.pipelines.super_resolution import (
    MAX_UNTILED_OUTPUT_PIXELS,
    SR_PIPELINE_CLASS,
    SuperResolutionPipeline,
    load_sr_pipeline,
)
from diffusekit.runtime.policy import Plan, pick_device


def is_pixel_sr_model(path: str | Path) -> bool:
    """Whether ``path`` is a folder exported by a super-resolution training run."""
    index = Path(path) / "model_index.json"
    try:
        return index.is_file() and read_json(index).get("_class_name") == SR_PIPELINE_CLASS
    except DiffusekitError:
        return False


def check_pixel_options(args: argparse.Namespace, settings) -> None:
    """The x4 upscaler's text options mean nothing to a pixel model: given, they are errors naming them."""
    for option, value, off in (("--prompt", args.prompt, ""), ("--negative", args.negative, ""),
                               ("--guidance", args.guidance, None)):  # fmt: skip
        if value is not None and value != off:
            raise ConfigError(f"{option} applies to the Stable Diffusion x4 upscaler only; this model is a pixel-space "
                              "super-resolution model, which takes no text")  # fmt: skip
    if settings.loras:
        raise ConfigError("--lora applies to the Stable Diffusion x4 upscaler only, not to a pixel-space model")


def pixel_tile(pipe: SuperResolutionPipeline, settings, h: int, w: int) -> tuple[int | None, int | None]:
    """(tile, overlap) in input pixels for an h x w input: --tile, but at most the size the model was trained
    at, rounded down to the model's input multiple; None where the input fits in one tile or --tile is 0."""
    m = pipe.input_multiple
    if settings.tile is None:
        if h * w * pipe.scale**2 > MAX_UNTILED_OUTPUT_PIXELS:
            raise ConfigError(f"{settings.name('--tile')} 0: an input of {w}x{h} pixels makes {h * w * pipe.scale**2} "
                              f"output pixels, more than {MAX_UNTILED_OUTPUT_PIXELS} in one pass would exhaust memory; "
                              "drop --tile 0 to upscale it in tiles")  # fmt: skip
        return None, None
    tile = min(settings.tile, pipe.train_input_size or settings.tile)
    tile = max(m, tile // m * m)
    if max(h, w) <= tile:
        return None, None
    overlap = settings.tile_overlap
    if overlap is not None and (overlap >= tile or overlap % m):
        raise ConfigError(f"{settings.name('--tile-overlap')} must be a multiple of {m} below the tile of {tile} "
                          f"input pixels (this model's training size), got {overlap}")  # fmt: skip
    return tile, overlap


def run_pixel_upscale(args: argparse.Namespace, job) -> int:
    """Upscale every input of ``job`` (a ``cli.upscale.Job``) with the pixel model it names."""
    settings, model = job.settings, job.model
    check_pixel_options(args, settings)
    writer = PngWriter(job.out, where=f"--out {job.out}")
    writer.prepare()
    written: list[Path] = []
    try:
        device = pick_device(args.device or "auto")
        if not args.quiet:
            print(f"loading {model}", file=sys.stderr)
        pipe = load_sr_pipeline(model, device=device, plan=Plan(dtype=DTYPES[settings.dtype]))
        if settings.scale is not None and settings.scale != pipe.scale:
            raise ConfigError(f"{settings.name('--scale')} {settings.scale}: this model was trained to upscale by "
                              f"{pipe.scale} only")  # fmt: skip
        level = settings.noise_level or 0
        if level > pipe.max_noise_level:
            raise ConfigError(f"{settings.name('--noise-level')} must be in [0, {pipe.max_noise_level}] for this model "
                              f"(the conditioning noise levels it was trained with), got {level}")  # fmt: skip
        sampler = settings.sampler or pipe.sampler_config.sampler
        if settings.eta is not None and sampler != "ddim":
            raise ConfigError(f"{settings.name('--eta')} applies to the ddim sampler only; this run uses {sampler} "
                              "(add --sampler ddim)")  # fmt: skip
        provenance = {"device": str(device), "batch_size": 1, **model_fingerprint(model)}
        mode = "L" if pipe.channels == 1 else "RGB"
        for i, item in enumerate(job.inputs):
            if not args.quiet:
                note = f" ({item.mode}, converted to {mode})" if item.mode != mode else ""
                print(f"upscaling {item.path}{note}", file=sys.stderr)
            image = read_image(item.path, mode, option="INPUT")[None]  # (1, C, h, w) in [0, 1]
            h, w = image.shape[2:]
            tile, overlap = pixel_tile(pipe, settings, h, w)
            seed = settings.seed + i
            result = pipe(image, steps=settings.steps, sampler=sampler, eta=settings.eta, noise_level=level,
                          generator=generators_from_seeds([seed], 1), tile=tile, tile_overlap=overlap,
                          show_progress=not args.quiet)  # fmt: skip
            height, width = result.images.shape[2:]
            recipe = Recipe(mode="upscale", prompt="", negative_prompt="", seed=seed, steps=settings.steps,
                            guidance=1.0, sampler=sampler, width=width, height=height, eta=settings.eta,
                            strength=None, model=model, tokenizer=None, image=str(item.path.absolute()), mask=None,
                            dtype=settings.dtype)  # fmt: skip
            written.append(write_upscaled(writer, result.images, recipe, item.path, provenance, noise_level=level,
                                          tile=tile, tile_overlap=overlap, input_width=w, input_height=h,
                                          scale=pipe.scale))  # fmt: skip
            print(written[-1], flush=True)
    finally:
        if not written:
            writer.discard()
    if job.compare_with is not None and not args.quiet:
        from diffusekit.cli.upscale import report_replay

        report_replay(job.compare_with, written[0], provenance)
    return 0


__all__ = ["check_pixel_options", "is_pixel_sr_model", "pixel_tile", "run_pixel_upscale"]
