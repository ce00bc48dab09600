"""What the generating commands share (txt2img, img2img, inpaint, upscale, sample): loading the model, ``--seed``,
``--guidance-interval LO,HI``, ``--lora FILE[:WEIGHT]`` and the LoRAs of a replay, writing an upscaled image with
its metadata, and the report comparing a replay with its original."""

from __future__ import annotations

import argparse
import math
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusekit.errors import ConfigError, DiffusekitError, WeightsError
from diffusekit.io.fingerprint import file_sha256
from diffusekit.io.images import to_pil
from diffusekit.io.png import PngWriter
from diffusekit.limits import check_int
from diffusekit.networks.lora import MAX_WEIGHT
from diffusekit.pipelines.recipe import (
    DEFAULTS,
    MAX_LORAS,
    MAX_SEED,
    Lora,
    Recipe,
    png_text,
    read_png_metadata,
    replay_differences,
    to_metadata,
)
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.samplers.guidance import check_guidance_interval

LORA_FORM = (f"FILE or FILE:WEIGHT, WEIGHT a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} (default 1), e.g. "
             "style.safetensors:0.8")  # fmt: skip


def load_model(
    model: str, tokenizer: str | None, *, allow_pickle: bool, device: torch.device, dtype: torch.dtype,
    upscaler: bool = False,
) -> StableDiffusion:  # fmt: skip
    """A diffusers-layout folder or a single checkpoint file (``pipelines.loading.load_pipeline``);
    ``tokenizer`` replaces the folder's tokenizer (and is required for single files, which carry none).
    ``upscaler``: the x4 upscaler is wanted (``diffusekit upscale``); either way the other kind is refused
    before any weights are read."""
    from diffusekit.pipelines.loading import UPSCALER_FOLDER, Layout, identify, load_pipeline

    path = Path(model)
    try:
        kind = identify(path)
    except WeightsError as e:  # its messages start with the path
        raise WeightsError(f"--model {e}") from None
    if upscaler and kind != UPSCALER_FOLDER:
        raise ConfigError(f"--model {path} is not an x4 upscaler (a folder whose model_index.json names "
                          "StableDiffusionUpscalePipeline); to redraw an image with it use "
                          "'diffusekit img2img'")  # fmt: skip
    if not upscaler and kind == UPSCALER_FOLDER:
        raise ConfigError(f"--model {path} is the x4 upscaler, which makes images larger: run "
                          f"'diffusekit upscale --model {path} IMAGE --out DIR'")  # fmt: skip
    if kind.layout is Layout.SINGLE_FILE and tokenizer is None:
        raise ConfigError(
            f"--model {path} is a single-file checkpoint, which carries no tokenizer; pass --tokenizer DIR (a "
            "folder with vocab.json and merges.txt, e.g. the tokenizer/ folder of any SD-1.x model)"
        )
    return load_pipeline(path, tokenizer=tokenizer, allow_pickle=allow_pickle, device=device, dtype=dtype)


def parse_seed(value: str | None) -> int:
    if value is None:
        return DEFAULTS["seed"]
    if value == "random":
        return secrets.randbelow(2**32)
    try:
        seed = int(value)
    except ValueError:
        raise ConfigError(f"--seed must be an integer in [0, {MAX_SEED}] or 'random', got {value!r}") from None
    return check_int("--seed", seed, 0, MAX_SEED)


def parse_guidance_interval(text: str | None, guidance: float | None = None) -> tuple[float, float] | None:
    """``--guidance-interval LO,HI`` -> (lo, hi), the noise levels sigma between which the guidance applies
    (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality
    in Diffusion Models"); HI may be ``inf``; None (not given) stays None. A ConfigError naming the option and its
    form otherwise, or when ``guidance``, the --guidance given, is 1: no guidance to limit."""
    if text is None:
        return None
    try:
        levels = [float(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if len(levels) != 2:  # the typed text in the message, not its parts
        raise ConfigError(f"--guidance-interval must be two noise levels LO,HI (sigma, e.g. 0.28,5.42; HI may be "
                          f"inf), got {text!r}")  # fmt: skip
    interval = check_guidance_interval(levels, "--guidance-interval")
    if guidance == 1.0:
        raise ConfigError("--guidance-interval limits the guidance, but --guidance is 1 (none): give --guidance S")
    return interval


def parse_lora(text: str) -> tuple[str, float | None]:
    """``--lora FILE[:WEIGHT]`` -> (absolute path, weight or None when not given). A FILE that exists is
    taken whole (its name may hold a ':'); else the text after the last ':' is the weight, unless it holds a
    path separator. A ConfigError naming --lora for an empty file, a weight that is no finite number in range."""
    path, weight = text, None
    if not Path(text).is_file() and ":" in text:
        head, tail = text.rsplit(":", 1)
        if "/" not in tail and "\\" not in tail:
            path, weight = head, tail
    if not path:
        raise ConfigError(f"--lora {text!r}: no file named; write {LORA_FORM}")
    if weight is None:
        return str(Path(path).absolute()), None
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"--lora {text!r}: the weight {weight!r} is not a number; write {LORA_FORM}") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise ConfigError(f"--lora {text!r}: the weight must be a finite number from -{MAX_WEIGHT:g} to "
                          f"{MAX_WEIGHT:g}, got {weight}")  # fmt: skip
    return str(Path(path).absolute()), value


def lora_options(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    given = [parse_lora(text) for text in args.lora or []]
    if len(given) > MAX_LORAS:
        raise ConfigError(f"--lora: at most {MAX_LORAS} LoRA files, got {len(given)}")
    for path, _ in given:
        if not Path(path).is_file():
            raise ConfigError(f"--lora {path}: no such file (a LoRA .safetensors file; write {LORA_FORM})")
    return given


def replay_loras(
    recorded: tuple[Lora, ...], given: list[tuple[str, float | None]]
) -> tuple[tuple[Lora, ...], list[str]]:
    """The LoRAs of a replay: the recorded ones, or the --lora files given, which replace them. A given file
    named as a recorded one must have its recorded content (its hash is carried over and checked before the
    model loads) and takes its recorded weight unless it names one. Returns (LoRAs, notes)."""
    if not given:
        return recorded, []
    by_name = {r.name: r for r in recorded}
    out = []
    for path, weight in given:
        r = by_name.get(Path(path).name)
        out.append(Lora(path, weight if weight is not None else (r.weight if r else 1.0), r.sha256 if r else None))
    kept = {x.name for x in out}
    notes = [f"replaying without the LoRA {r.name} the PNG records (the --lora files replace the recorded ones)"
             for r in recorded if r.name not in kept]  # fmt: skip
    return tuple(out), notes


def report_replay(original: Path, replayed: Path, provenance: dict[str, Any]) -> None:
    try:
        with Image.open(original) as a, Image.open(replayed) as b:
            x = np.asarray(a.convert("RGB"), dtype=np.int16)
            y = np.asarray(b.convert("RGB"), dtype=np.int16)
        recorded = read_png_metadata(original)
    except (OSError, DiffusekitError) as e:  # the original went away or changed meanwhile
        print(f"replay: cannot compare with {original} ({e})", file=sys.stderr)
        return
    if x.shape == y.shape and np.array_equal(x, y):
        print(f"replay: identical to {original}", file=sys.stderr)
        return
    diff = int(np.abs(x - y).max()) if x.shape == y.shape else "n/a (sizes differ)"
    causes = replay_differences(recorded, provenance) or [
        "the same recipe and files: a different machine, library version or thread count changes the last bits"
    ]
    print(f"replay: differs from {original} (largest pixel difference {diff}): {'; '.join(causes)}",
          file=sys.stderr)  # fmt: skip


def write_upscaled(
    writer: PngWriter, images: torch.Tensor, recipe: Recipe, source: Path, provenance: dict[str, Any], **extra: Any
) -> Path:
    """Write the upscaled ``images`` (1, C, H, W) as the next numbered PNG, with the recipe's metadata and a
    provenance that adds the input file's SHA-256 and the upscaling settings ``extra`` (noise level, tiles, the
    input's size). An input that can no longer be read is a ConfigError naming it."""
    try:
        image_hash = file_sha256(source)
    except OSError as e:
        raise ConfigError(f"INPUT {source}: cannot be read ({e.strerror or e})") from None
    meta = to_metadata(recipe, width=recipe.width, height=recipe.height, sampler=recipe.sampler,
                       provenance={**provenance, "image_sha256": image_hash, **extra})  # fmt: skip
    return writer.write(to_pil(images)[0], recipe.seed, png_text(meta))


__all__ = ["LORA_FORM", "load_model", "lora_options", "parse_guidance_interval", "parse_lora", "parse_seed",
           "replay_loras", "report_replay", "write_upscaled"]  # fmt: skip
