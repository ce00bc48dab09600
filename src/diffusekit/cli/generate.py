"""``diffusekit txt2img | img2img | inpaint``: generate images with a Stable Diffusion model.

The command line is one way to write a :class:`~diffusekit.pipelines.recipe.Recipe`:
:mod:`diffusekit.cli.generate_jobs` maps options (or a PNG to replay) to recipe fields, and field names back to
options in messages; this module checks the output folder before the model loads, runs the recipes in network
batches and writes the PNGs. Every PNG carries its recipe in its metadata (see :mod:`diffusekit.pipelines.recipe`);
``--replay`` makes it again. Image i of a run uses seed ``--seed + i`` through its own random generator, and
images are generated one per network batch by default, so ``--replay`` of any one image reproduces it bit for bit
on the same machine, device and dtype.

``--sampler`` takes the popular web UI's names (``"DPM++ 2M Karras"``: :mod:`diffusekit.samplers.names`);
``--lora FILE[:WEIGHT]`` attaches LoRA files once per run, each recorded with its SHA-256, so ``--replay``
refuses a different file under the same name. ``--replay`` also reads another SD tool's ``parameters`` text
(then ``--model`` names the model).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from diffusekit.cli.common import load_model, report_replay
from diffusekit.cli.generate_jobs import Job, job_from_args, job_from_replay, option_name
from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.fingerprint import file_sha256, model_fingerprint
from diffusekit.io.png import PngWriter
from diffusekit.pipelines.openvino_unet import ENGINES, check_engine, use_engine
from diffusekit.pipelines.recipe import (
    AUTO_DTYPE_HELP,
    DEFAULT_STRENGTH,
    DEFAULTS,
    DTYPES,
    LCM_GUIDANCE,
    MAX_STEPS,
    Recipe,
    apply_loras,
    check_lora_files,
    generate,
    png_text,
    read_png_metadata,
    replay_differences,
    resolve,
    to_metadata,
)
from diffusekit.runtime.policy import pick_device
from diffusekit.samplers.config import SAMPLERS
from diffusekit.samplers.names import WEB_UI

MODES = ("txt2img", "img2img", "inpaint")


def _run(args: argparse.Namespace, mode: str) -> int:
    job = job_from_replay(args, mode) if args.replay is not None else job_from_args(args, mode)
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
