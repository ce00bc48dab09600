"""``diffusekit txt2img | img2img | inpaint``: generate images with a Stable Diffusion model.

The command line is one way to write a :class:`~diffusekit.pipelines.recipe.Recipe`: this module maps
options to recipe fields (and field names back to options in messages), checks the output folder before the
model loads, runs the recipes in network batches and writes the PNGs. Every PNG carries its recipe in its
metadata (see :mod:`diffusekit.pipelines.recipe`); ``--replay`` makes it again. Image i of a run uses seed
``--seed + i`` through its own random generator, and images are generated one per network batch by default,
so ``--replay`` of any one image reproduces it bit for bit on the same machine, device and dtype.

``--sampler`` takes the popular web UI's names (``"DPM++ 2M Karras"``: :mod:`diffusekit.samplers.names`);
``--lora FILE[:WEIGHT]`` attaches LoRA files once per run, each recorded with its SHA-256, so ``--replay``
refuses a different file under the same name. ``--replay`` also reads another SD tool's ``parameters`` text
(then ``--model`` names the model).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from diffusekit.cli.common import (
    load_model,
    lora_options,
    parse_guidance_interval,
    parse_seed,
    replay_loras,
    report_replay,
)
from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.fingerprint import file_sha256, model_fingerprint
from diffusekit.io.png import PngWriter
from diffusekit.limits import check_int
from diffusekit.pipelines.openvino_unet import ENGINES, check_engine, use_engine
from diffusekit.pipelines.recipe import (
    AUTO_DTYPE_HELP,
    DEFAULT_STRENGTH,
    DEFAULTS,
    DTYPES,
    LCM_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    PARAMETER_KEYS,
    Lora,
    Parameters,
    Recipe,
    apply_loras,
    check_lora_files,
    chosen_dtype,
    generate,
    parse_size,
    png_text,
    read_png_metadata,
    read_png_settings,
    recipe_from_metadata,
    replay_differences,
    resolve,
    sampler_and_grid,
    to_metadata,
)
from diffusekit.runtime.policy import pick_device
from diffusekit.samplers.config import SAMPLERS
from diffusekit.samplers.names import WEB_UI

MODES = ("txt2img", "img2img", "inpaint")
RUN_DEFAULTS = {"n": 1, "batch_size": 1}
# recipe fields whose option is not --FIELD
_OPTIONS = {"prompt": "PROMPT", "negative_prompt": "--negative", "width": "--size", "height": "--size",
            "karras": "--sampler", "loras": "--lora"}  # fmt: skip


def option_name(field: str) -> str:
    """The command-line option that sets a recipe field (the vocabulary of this command's messages)."""
    return _OPTIONS.get(field, f"--{field.replace('_', '-')}")


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Job:
    """What a run makes: the recipe of every image (each with its own prompt and seed)."""

    images: list[Recipe]
    batch_size: int
    compare_with: Path | None = None  # a replayed PNG to compare the result with
    name: Callable[[str], str] = option_name  # how messages name a recipe field
    guidance_given: bool = True  # False: the default guidance, which an LCM run replaces with LCM_GUIDANCE
    notes: list[str] = dataclass_field(default_factory=list)  # printed to stderr before the run (unless --quiet)


def _job_from_args(args: argparse.Namespace, mode: str) -> Job:
    prompts = list(args.prompt or [])
    if not prompts:
        raise ConfigError("no prompt given: pass one or more PROMPT arguments (or --replay PNG)")
    if args.model is None:
        raise ConfigError("--model PATH is required (a diffusers model folder or a .safetensors file)")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder the PNGs are written to)")
    n = check_int("--n", RUN_DEFAULTS["n"] if args.n is None else args.n, 1, 10_000)
    batch_size = check_int("--batch-size", RUN_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size,
                           1, 1024)  # fmt: skip
    seed = parse_seed(args.seed)
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise ConfigError(f"--seed {seed} + {len(prompts) * n} images exceeds the largest seed {MAX_SEED}")
    width, height = parse_size(args.size, "--size") if args.size is not None else (None, None)
    sampler, karras = sampler_and_grid(option_name, args.sampler, None)
    loras = tuple(Lora(path, 1.0 if weight is None else weight) for path, weight in lora_options(args))
    base = Recipe(
        mode=mode,
        prompt=prompts[0],
        negative_prompt=DEFAULTS["negative_prompt"] if args.negative is None else args.negative,
        seed=seed,
        steps=DEFAULTS["steps"] if args.steps is None else args.steps,
        guidance=DEFAULTS["guidance"] if args.guidance is None else args.guidance,
        guidance_interval=parse_guidance_interval(args.guidance_interval, args.guidance),
        sampler=sampler,
        karras=karras,
        loras=loras,
        width=width,
        height=height,
        eta=args.eta,
        strength=DEFAULT_STRENGTH[mode] if getattr(args, "strength", None) is None else args.strength,
        model=str(Path(args.model).absolute()),
        tokenizer=None if args.tokenizer is None else str(Path(args.tokenizer).absolute()),
        image=_input_path(args, "image", mode),
        mask=_input_path(args, "mask", mode),
        dtype=chosen_dtype(args.dtype, pick_device(args.device or "auto")),
    )
    images = []
    for p_index, prompt in enumerate(prompts):
        for k in range(n):
            images.append(base.replace(prompt=prompt, seed=seed + p_index * n + k).validated(option_name))
    return Job(images, batch_size, guidance_given=args.guidance is not None)


def _input_path(args: argparse.Namespace, name: str, mode: str) -> str | None:
    needed = mode == "inpaint" if name == "mask" else mode != "txt2img"
    if not needed:
        return None
    value = getattr(args, name, None)
    if value is None:
        raise ConfigError(f"--{name} FILE is required for {mode}")
    return str(Path(value).absolute())


# Options that may override a replayed PNG's recipe (explicitly given ones only) -> the field they set.
_OVERRIDES = {"model": "model", "tokenizer": "tokenizer", "negative": "negative_prompt", "steps": "steps",
              "guidance": "guidance", "guidance_interval": "guidance_interval", "eta": "eta", "strength": "strength",
              "image": "image", "mask": "mask", "dtype": "dtype"}  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields set by options given beside --replay (--sampler also sets karras)."""
    for option in ("n", "batch_size"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} cannot be combined with --replay (it makes one image)")
    changes: dict[str, Any] = {}
    for option, field_name in _OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            if option in ("model", "tokenizer", "image", "mask"):
                value = str(Path(value).absolute())
            if option == "dtype":
                value = chosen_dtype(value, pick_device(args.device or "auto"))
            value = parse_guidance_interval(value, args.guidance) if option == "guidance_interval" else value
            changes[field_name] = value
    if args.sampler is not None:
        changes["sampler"], changes["karras"] = sampler_and_grid(option_name, args.sampler, None)
    if args.prompt:
        if len(args.prompt) != 1:
            raise ConfigError("--replay takes at most one PROMPT (it makes one image)")
        changes["prompt"] = args.prompt[0]
    if args.seed is not None:
        changes["seed"] = parse_seed(args.seed)
    if args.size is not None:
        changes["width"], changes["height"] = parse_size(args.size, "--size")
    return changes


def _job_from_replay(args: argparse.Namespace, mode: str) -> Job:
    source = Path(args.replay)
    where = f"--replay {source}"
    settings = read_png_settings(source)
    if isinstance(settings, Parameters):
        return _job_from_parameters(args, mode, settings, where)
    recorded = recipe_from_metadata(settings, where)
    if recorded.mode != mode:
        raise ConfigError(f"{where} was made by 'diffusekit {recorded.mode}'; "
                          f"run 'diffusekit {recorded.mode} --replay {source}'")  # fmt: skip
    changes = _overrides(args)
    if changes.get("sampler") not in (None, "ddim") and "eta" not in changes:
        changes["eta"] = None  # the recorded DDIM eta means nothing to the sampler asked for
    loras, notes = replay_loras(recorded.loras, lora_options(args))
    if loras != recorded.loras:
        changes["loras"] = loras

    def name(field_name: str) -> str:  # an option the user gave, or the field of the PNG
        return option_name(field_name) if field_name in changes else f"{where}: field '{field_name}'"

    recipe = recorded.replace(**changes).validated(name)
    # the files may have moved; any other change makes a different image, so there is nothing to compare
    same_loras = [(x.name, x.weight, x.sha256) for x in loras] == [(x.name, x.weight, x.sha256) for x in recorded.loras]
    same_recipe = set(changes) <= {"model", "tokenizer", "image", "mask", "loras"} and same_loras
    guidance_given = "sampler" not in changes or "guidance" in changes  # another sampler: LCM may pick guidance
    return Job([recipe], 1, compare_with=source if same_recipe else None, name=name, guidance_given=guidance_given,
               notes=notes)  # fmt: skip


def _job_from_parameters(args: argparse.Namespace, mode: str, p: Parameters, where: str) -> Job:
    """--replay of another SD tool's PNG: its ``parameters`` settings with the model (and inputs) given."""
    if args.model is None:
        raise ConfigError(f"{where} was made by another tool: its 'parameters' text names no model file; pass "
                          "--model PATH to make it again with its settings")  # fmt: skip
    changes = _overrides(args)
    data: dict[str, Any] = {"mode": mode, **p.fields, **changes}
    notes = [f"{where} was made by another tool: its settings run on --model {changes['model']}; that tool's "
             "noise differs, so the image will not be the same"]  # fmt: skip
    if mode == "txt2img" and "strength" in data:
        data.pop("strength")  # the web UI records its hires fix's strength in txt2img images
        p.unused.append("Denoising strength")
    for field_name in ("image", "mask"):
        if field_name not in data:
            data[field_name] = _input_path(args, field_name, mode)
    given = lora_options(args)
    loras: list[dict[str, Any]] = []
    for tag, tag_weight in p.loras.items():  # <lora:NAME:WEIGHT> in the prompt names a file by its stem
        match = next(((path, w) for path, w in given if tag in (Path(path).stem, Path(path).name)), None)
        if match is None:
            raise ConfigError(f"{where}: its prompt uses the LoRA {tag!r} (<lora:{tag}:{tag_weight:g}>); pass "
                              "--lora FILE for it (its weight defaults to the prompt's)")  # fmt: skip
        loras.append({"path": match[0], "weight": tag_weight if match[1] is None else match[1]})
    named = {x["path"] for x in loras}
    loras += [{"path": path, "weight": 1.0 if w is None else w} for path, w in given if path not in named]
    data["loras"] = loras
    if p.unused:
        notes.append(f"{where}: not used: {', '.join(p.unused)}")

    def name(field_name: str) -> str:
        if field_name in changes or field_name not in PARAMETER_KEYS or field_name not in p.fields:
            return option_name(field_name)
        return f"{where}: '{PARAMETER_KEYS[field_name]}'"

    recipe = Recipe.from_dict(data, name=name)
    return Job([recipe], 1, name=name, notes=notes, guidance_given="guidance" in data)


def _run(args: argparse.Namespace, mode: str) -> int:
    job = _job_from_replay(args, mode) if args.replay is not None else _job_from_args(args, mode)
    first, name = job.images[0], job.name
    out = Path(args.out) if args.out is not None else Path(args.replay).parent
    writer = PngWriter(out, where=f"--out {out}")
    writer.prepare()  # a folder that cannot be written fails now, not after the images are made
    written: list[Path] = []
    try:
        device = pick_device(args.device or "auto")
        check_engine(args.engine, device)  # a missing package or a GPU fails before the model loads
        quiet = bool(args.quiet)
        if first.tokenizer is not None and not Path(first.tokenizer).is_dir():
            raise ConfigError(f"{name('tokenizer')} {first.tokenizer}: no such folder (a tokenizer folder holds "
                              "vocab.json and merges.txt)")  # fmt: skip
        loras = check_lora_files(first.loras, name)  # missing files and changed hashes fail before the model loads
        for note in job.notes if not quiet else ():
            print(f"note: {note}", file=sys.stderr)
        if not quiet:
            print(f"loading {first.model}", file=sys.stderr)
        try:
            sd = load_model(first.model, first.tokenizer, allow_pickle=bool(args.allow_pickle), device=device,
                            dtype=DTYPES[first.dtype])  # fmt: skip
        except DiffusekitError as e:
            if args.replay is None:
                raise
            raise type(e)(f"--replay {args.replay}: the model it names cannot be loaded: {e}") from None
        apply_loras(sd, loras, name, verify=False)  # once for the run; another architecture's LoRA fails here
        if args.engine != "torch":
            use_engine(sd.unet, args.engine, notify=None if quiet else lambda m: print(f"note: {m}", file=sys.stderr))
        images = [r.replace(loras=loras) for r in job.images]  # each with its LoRA files' hashes
        resolved = resolve(first, sd, name)
        if resolved.sampler == "lcm" and not job.guidance_given and first.guidance != LCM_GUIDANCE:
            images = [r.replace(guidance=LCM_GUIDANCE) for r in images]
            if not quiet:
                print(f"note: {_lcm_note(first, resolved.sampler)}", file=sys.stderr)
        provenance = _provenance(first, job, device, args.engine)
        if job.compare_with is not None and not quiet:
            for cause in replay_differences(read_png_metadata(job.compare_with), provenance):
                print(f"warning: {cause}", file=sys.stderr)
        for start in range(0, len(images), job.batch_size):
            batch = images[start : start + job.batch_size]
            for recipe, image in zip(batch, generate(sd, batch, resolved, show_progress=not quiet)):
                meta = to_metadata(recipe, width=resolved.width, height=resolved.height, sampler=resolved.sampler,
                                   karras=resolved.karras, provenance=provenance)  # fmt: skip
                written.append(writer.write(image, recipe.seed, png_text(meta)))
                print(written[-1], flush=True)
    finally:
        if not written:
            writer.discard()  # a failed run leaves no empty folder behind
    if job.compare_with is not None and not quiet:
        report_replay(job.compare_with, written[0], provenance)
    return 0


def _lcm_note(recipe: Recipe, sampler: str) -> str:
    said = "--sampler LCM" if recipe.sampler == sampler else f"this model's own sampler is {sampler}"
    steps = "; LCM needs only 2-8 steps, e.g. --steps 4" if recipe.steps > 8 else ""
    unused = "; --guidance-interval has nothing to limit at guidance 1" if recipe.guidance_interval else ""
    return (f"{said}: using --guidance {LCM_GUIDANCE:g}, the guidance latent consistency models are made for "
            f"(pass --guidance to choose another){steps}{unused}")  # fmt: skip


def _provenance(recipe: Recipe, job: Job, device: torch.device, engine: str = "torch") -> dict[str, Any]:
    """What besides the recipe decides the pixels, recorded in each PNG to explain a replay that differs."""
    provenance: dict[str, Any] = {"device": str(device), "batch_size": job.batch_size,
                                  **model_fingerprint(recipe.model, recipe.tokenizer)}  # fmt: skip
    if engine != "torch":  # PyTorch's kernels are the default and are not recorded
        provenance["engine"] = engine
    for field in ("image", "mask"):
        path = getattr(recipe, field)
        if path is not None:
            try:
                provenance[f"{field}_sha256"] = file_sha256(path)
            except OSError as e:
                raise ConfigError(f"{option_name(field)} {path}: cannot be read ({e.strerror or e})") from None
    return provenance


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
  diffusekit txt2img --model ./sd-xl-base "a red fox" --guidance 5 --guidance-interval 0.28,5.42 --out out/
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
Each PNG records its settings (prompt, negative prompt, seed, sampler, steps, guidance and its interval,
size, eta, strength, model, input files, dtype, diffusekit version) in a 'diffusekit' JSON text chunk and
a readable 'parameters' chunk. --replay PNG makes that image again; options given beside --replay override
the recorded ones. Images are generated one per network batch (--batch-size 1), so a replay on the same
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
        # argparse takes '-16x16' for an option unless it looks like a negative number: let every '-digit'
        # value through, so that '--size -16x16' and '--guidance -1e3' get the checks' own messages
        if hasattr(p, "_negative_number_matcher"):
            p._negative_number_matcher = re.compile(r"^-\.?\d")


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
    model.add_argument("--dtype", choices=["auto", *DTYPES], help=AUTO_DTYPE_HELP)
    model.add_argument("--engine", choices=ENGINES, default="torch",
                       help="what runs the U-Net: torch (default: PyTorch with diffusekit's kernels) or openvino "
                       "(CPU only; pip install 'diffusekit[engines]'). OpenVINO is faster in bfloat16 on CPUs "
                       "with native bf16 (about 1.3x on Zen 4); the first run converts the model (about 2 "
                       "minutes for SD-1.5 on 2 cores) and keeps it in the user cache for later runs. Images match "
                       "--engine torch up to rounding, not bit for bit")  # fmt: skip

    gen = p.add_argument_group("generation")
    gen.add_argument("--negative", metavar="TEXT",
                     help="negative prompt: what the image should not show (default: empty)")
    gen.add_argument("--steps", type=int, metavar="N",
                     help=f"denoising steps, 1-{MAX_STEPS} (default {DEFAULTS['steps']}); img2img/inpaint run "
                     "int(N x strength) of them")  # fmt: skip
    gen.add_argument("--guidance", type=float, metavar="SCALE",
                     help=f"classifier-free guidance scale, >= 0 (default {DEFAULTS['guidance']}); 1 disables "
                     "guidance and the negative prompt")  # fmt: skip
    gen.add_argument("--guidance-interval", metavar="LO,HI",
                     help="apply the guidance only at noise levels LO < sigma <= HI, the conditional model alone at "
                     "the other steps (Kynkaanniemi et al. 2024, 'Applying Guidance in a Limited Interval Improves "
                     "Sample and Distribution Quality in Diffusion Models': guidance at high noise costs variety, at "
                     "low noise it does little). sigma = sqrt((1 - abar) / abar) runs from about 14.6 down to 0.03 "
                     "on SD's schedule; the paper's SD-XL setting is 0.28,5.42. HI may be inf (no upper end); 0,inf "
                     "guides at every step (and clears a replayed PNG's interval). Default: every step")  # fmt: skip
    gen.add_argument("--sampler", metavar="NAME",
                     help="sampler, as the popular web UI names it (any case; quote names with spaces): "
                     f"{', '.join(n.name for n in WEB_UI)}; or ours: {', '.join(SAMPLERS)} (our names keep the "
                     "model's own sigma grid; 'DPM++ 2M Karras' and 'DPM2 Karras' use Karras sigmas). Default: "
                     "the model's own (PLMS for SD-1.x). LCM uses --guidance 1 unless given, and 2-8 "
                     "--steps")  # fmt: skip
    gen.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                     help="attach a LoRA file (kohya/A1111 or PEFT .safetensors) with WEIGHT (default 1; 0 is off, "
                     "negative subtracts it); repeat for several. Recorded in the PNG with the file's SHA-256: "
                     "--replay refuses a different file under the same name, and --lora beside --replay replaces "
                     "the recorded files (a recorded name keeps its weight unless one is given)")  # fmt: skip
    gen.add_argument("--eta", type=float, metavar="ETA",
                     help="DDIM noise, 0 (deterministic, default) to 1 (DDPM-like); ddim sampler only")
    gen.add_argument("--seed", metavar="N",
                     help=f"random seed of the first image, 0 to 2^63-1, or 'random' (default {DEFAULTS['seed']}); "
                     "image i of the run uses seed N+i")  # fmt: skip
    size_help = (
        "image size in pixels, WIDTHxHEIGHT or one number for a square; multiples of 4 and of the model's "
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
        default = DEFAULT_STRENGTH[mode]
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


__all__ = ["add_parser", "load_model", "option_name", "run_img2img", "run_inpaint", "run_txt2img"]
