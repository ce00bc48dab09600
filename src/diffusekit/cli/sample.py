"""``diffusekit sample``: generate a grid of images from a trained model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusekit.cli.common import parse_guidance_interval
from diffusekit.errors import ConfigError, OutputError
from diffusekit.io.images import WRITE_FORMATS
from diffusekit.limits import MAX_CLASSES, check_float, check_int
from diffusekit.pipelines.recipe import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    USER_SAMPLERS,
    check_sampler,
    interval_to_json,
)
from diffusekit.pipelines.unconditional import GUIDE_LABELS

DESCRIPTION = """\
Generate images from a pixel-space diffusion model and save them as one PNG grid (and optionally as
separate files). MODEL is an inference folder (model_index.json + unet/ + scheduler/, as `diffusekit train`
exports to RUN/model and the reference DDPMPipeline layout), a training run folder, or one of its
checkpoints (EMA weights unless --raw-weights).

Class-conditional models take --class (one id, or one per image); without it they sample unconditionally
with the "no class" id. --guidance S > 1 applies classifier-free guidance (Ho & Salimans 2022):
eps = eps_uncond + S (eps_cond - eps_uncond); --guidance-interval limits it to a range of noise levels.
--guide-model G guides with a weaker version of the model instead (autoguidance, Karras et al. 2024:
eps = eps_G + S (eps - eps_G)): an early EMA of the same run, as `diffusekit ema-reconstruct` writes.
The PNG carries the settings as text metadata."""

EPILOG = """\
examples:
  diffusekit sample runs/demo/model --n 64 --out grid.png
  diffusekit sample runs/demo --class 7 --guidance 3 --n 16 --sampler ddpm --steps 1000 --out sevens.png
  diffusekit sample runs/demo --guidance 3 --guidance-interval 0.28,5 --class 0 1 2 3 4 5 6 7 8 9 --n 10
  diffusekit ema-reconstruct runs/mnist --sigma-rel 0.05 --step 3000 --out runs/mnist/guide
  diffusekit sample runs/mnist --guide-model runs/mnist/guide --guidance 2 --n 64 --out autoguided.png
  diffusekit sample runs/demo/model --n 8 --out grid.jpg --out-dir singles/"""

MAX_IMAGES = 100_000  # --n
MAX_BATCH = 4096  # --batch-size
MAX_SCALE = 64  # --scale (the grid's size is bounded as a whole too)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help="generate images from a trained model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="inference folder, run folder or training checkpoint")
    p.add_argument("--n", type=int, default=64, metavar="N", help=f"number of images, 1-{MAX_IMAGES} (default 64)")
    p.add_argument("--sampler", metavar="NAME",
                   help=f"{', '.join(USER_SAMPLERS)} (default: ddim; heun for a model trained with "
                        "--preconditioning edm)")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, metavar="N",
                   help=f"sampling steps, 1-{MAX_STEPS} and at most the model's training steps (default 50)")
    p.add_argument("--eta", type=float, metavar="ETA",
                   help="DDIM eta in [0, 1]: 0 deterministic (default), 1 = DDPM-like")  # fmt: skip
    p.add_argument(
        "--class",
        dest="class_labels",
        type=int,
        nargs="+",
        metavar="K",
        help="class id(s): one for all images or one per image (default: the model's \"no class\" id)",
    )
    p.add_argument("--guidance", type=float, default=1.0, metavar="S",
                   help=f"classifier-free guidance scale in [0, {MAX_GUIDANCE:g}] (default 1: no guidance)")
    p.add_argument("--guidance-interval", metavar="LO,HI",
                   help="apply the guidance only at noise levels LO < sigma <= HI (Kynkaanniemi et al. 2024: guidance "
                        "at high noise costs diversity, at low noise it does little); sigma is the EDM noise level "
                        "(0.002-80 on an EDM model's grid). Default: at every step")
    p.add_argument("--guide-model", metavar="MODEL",
                   help="autoguidance (Karras et al. 2024): a weaker version of MODEL (an earlier EMA of its run, e.g. "
                        "from `diffusekit ema-reconstruct RUN --step N`) to guide away from; --guidance S is then the "
                        "autoguidance weight (out = guide + S (model - guide)), for class-conditional and "
                        "unconditional models alike")
    p.add_argument("--guide-labels", choices=GUIDE_LABELS, default="class",
                   help="what the --guide-model sees, for class-conditional models: class, each image's class (the "
                        "paper's choice; default), or none, the \"no class\" label: a guide both earlier and "
                        "unconditional, which kept more digits in their class on the main job's model "
                        "(benchmarks/README.md)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help=f"image i uses seed N + i, N in [0, {MAX_SEED}] (default 0)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help=f"images per network batch, 1-{MAX_BATCH} (default 64)")  # fmt: skip
    p.add_argument("--out", default="samples.png", metavar="FILE",
                   help=f"grid image, ending in {', '.join(WRITE_FORMATS)} (default samples.png); an existing "
                   "file is kept unless --overwrite")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--nrow", type=int, metavar="N", help="images per grid row (default: near-square)")
    p.add_argument("--scale", type=int, default=1, metavar="N",
                   help=f"enlarge the grid N times (nearest), 1-{MAX_SCALE} (default 1)")  # fmt: skip
    p.add_argument("--out-dir", metavar="DIR",
                   help="also save every image as DIR/NNNNN-SEED.png, numbered after the files already there "
                   "(never replacing one)")  # fmt: skip
    p.add_argument("--raw-weights", action="store_true", help="use a checkpoint's raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(run=run)
    return p


def check_options(args: argparse.Namespace) -> list[int] | None:
    """Every option that can be checked without the model, before it loads; returns the class ids, one
    per image (or None)."""
    n = check_int("--n", args.n, 1, MAX_IMAGES)
    check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    check_int("--steps", args.steps, 1, MAX_STEPS)
    check_int("--scale", args.scale, 1, MAX_SCALE)
    if args.nrow is not None:
        check_int("--nrow", args.nrow, 1, MAX_IMAGES)
    check_int("--seed", args.seed, 0, MAX_SEED)
    if args.seed + n - 1 > MAX_SEED:
        raise ConfigError(f"--seed {args.seed} + {n} images exceeds the largest seed {MAX_SEED}")
    if args.eta is not None:
        check_float("--eta", args.eta, 0.0, 1.0)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    args.guidance_interval = parse_guidance_interval(args.guidance_interval, args.guidance)
    if args.guide_model is not None and args.guidance == 1.0:
        raise ConfigError("--guide-model guides with the weight --guidance, which is 1 (no guidance): give "
                          "--guidance S, e.g. 2")  # fmt: skip
    if args.guide_labels != "class" and args.guide_model is None:
        raise ConfigError(f"--guide-labels {args.guide_labels} applies to autoguidance: give --guide-model MODEL")
    if args.sampler is not None:
        args.sampler = check_sampler("--sampler", args.sampler)
    labels = args.class_labels
    if labels is None:
        return None
    if len(labels) not in (1, n):
        raise ConfigError(f"--class takes one id or --n={n} ids, got {len(labels)}")
    for k in labels:
        check_int("--class", k, 0, MAX_CLASSES - 1)
    return labels * n if len(labels) == 1 else list(labels)


def check_model(args: argparse.Namespace, pipe, labels: list[int] | None) -> None:
    """The options that depend on the model, checked before anything is generated."""
    from diffusekit.io.images import check_grid_size

    num_classes = pipe.unet.config.num_classes
    if num_classes is None:
        if labels is not None:
            raise ConfigError(f"--class: {args.model} is not a class-conditional model")
        if args.guidance != 1.0 and args.guide_model is None:
            raise ConfigError(f"--guidance needs a class-conditional model or --guide-model; {args.model} has no "
                              "classes (leave it at 1)")  # fmt: skip
        if args.guidance_interval is not None and args.guide_model is None:
            raise ConfigError(f"--guidance-interval needs a class-conditional model; {args.model} has no classes")
        if args.guide_labels != "class":
            raise ConfigError(f"--guide-labels {args.guide_labels}: {args.model} is not class-conditional (it has "
                              "no labels to withhold from the guide)")  # fmt: skip
    elif labels is not None and max(labels) >= num_classes:
        raise ConfigError(f"--class ids of {args.model} are in [0, {num_classes - 1}], got {max(labels)}")
    train_steps = pipe.sampler_config.num_train_timesteps
    if args.steps > train_steps:
        raise ConfigError(f"--steps must be at most {train_steps} (the model's training steps), got {args.steps}")
    size = pipe.image_size  # pixels: a latent model's samples are decoded to the VAE's size
    check_grid_size(args.n, size, size, args.nrow, scale=args.scale, where="--n/--nrow/--scale")


def load_guide(path: str, pipe, device):
    """The --guide-model U-Net, refused unless its outputs can be mixed with the model's: the same
    preconditioning, prediction type and shapes (Karras et al. 2024 guide with a version of the same model)."""
    from diffusekit.pipelines.unconditional import check_guide
    from diffusekit.training.export import load_for_sampling

    try:
        guide = load_for_sampling(path, device=device)
    except ConfigError as e:
        raise ConfigError(f"--guide-model: {e}") from None
    mine, theirs = pipe.sampler_config, guide.sampler_config
    for name in ("preconditioning", "prediction_type", "sigma_data"):
        if getattr(mine, name) != getattr(theirs, name):
            raise ConfigError(f"--guide-model {path}: {name} is {getattr(theirs, name)!r}, the model's is "
                              f"{getattr(mine, name)!r}; a guide must be a version of the same model")  # fmt: skip
    if pipe.image_size != guide.image_size or type(pipe.codec) is not type(guide.codec):
        raise ConfigError(f"--guide-model {path}: makes {guide.image_size}px images in another space than the "
                          f"model's {pipe.image_size}px; a guide must be a version of the same model")  # fmt: skip
    check_guide(pipe.unet, guide.unet, f"--guide-model {path}")
    return guide.unet


def run(args: argparse.Namespace) -> int:
    from diffusekit.io.images import check_image_output, save_image_grid, to_pil, to_uint8
    from diffusekit.io.png import PngWriter
    from diffusekit.pipelines.common import generators_from_seeds
    from diffusekit.runtime.policy import pick_device
    from diffusekit.training.export import load_for_sampling

    labels = check_options(args)
    device = pick_device(args.device)
    out = check_image_output(args.out, "--out", overwrite=args.overwrite)
    writer = PngWriter(args.out_dir, where=f"--out-dir {args.out_dir}") if args.out_dir else None
    if writer is not None:
        if Path(args.out_dir).resolve() == out.resolve():
            raise ConfigError(f"--out-dir {args.out_dir} is the --out file; name a folder")
        writer.prepare()
    try:
        pipe = load_for_sampling(args.model, use_ema=not args.raw_weights, device=device)
        if args.sampler is None:  # the model's own for EDM models (Karras et al. 2022 Alg. 1), else DDIM
            args.sampler = "heun" if pipe.sampler_config.preconditioning == "edm" else "ddim"
        check_model(args, pipe, labels)
        guide = None if args.guide_model is None else load_guide(args.guide_model, pipe, device)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    settings = {
        "model": str(args.model),
        "sampler": args.sampler,
        "steps": args.steps,
        "seed": args.seed,
        "guidance_scale": args.guidance,
        "guidance_interval": interval_to_json(args.guidance_interval),  # JSON has no infinity: an open end is null
        "guide_model": None if args.guide_model is None else str(args.guide_model),
        "guide_labels": None if args.guide_model is None else args.guide_labels,
        "class_labels": labels,
        "eta": args.eta,
    }
    t0 = time.perf_counter()
    chunks = []  # uint8 pixels: a quarter of the memory of the float images
    for i in range(0, args.n, args.batch_size):
        k = min(args.batch_size, args.n - i)
        images = pipe(
            k,
            steps=args.steps,
            sampler=args.sampler,
            eta=args.eta,
            generator=generators_from_seeds(args.seed + i, k),
            class_labels=labels[i : i + k] if labels else None,
            guidance_scale=args.guidance,
            guidance_interval=args.guidance_interval,
            guide=guide,
            guide_labels=args.guide_labels,
        )
        if writer is not None:
            for j, img in enumerate(to_pil(images)):
                meta = {**settings, "seed": args.seed + i + j, "class_labels": labels[i + j] if labels else None}
                writer.write(img, args.seed + i + j, {"diffusekit": json.dumps(meta, allow_nan=False)})
        chunks.append(torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2))
    metadata = {"diffusekit": json.dumps(settings, allow_nan=False)}
    try:
        path = save_image_grid(torch.cat(chunks), out, nrow=args.nrow, scale=args.scale, metadata=metadata,
                               overwrite=args.overwrite)  # fmt: skip
    except OutputError as e:
        raise OutputError(f"--out {e}") from None
    print(
        f"wrote {args.n} images to {path} ({time.perf_counter() - t0:.1f} s)"
        + (f" and {args.out_dir}/" if args.out_dir else "")
    )
    return 0
