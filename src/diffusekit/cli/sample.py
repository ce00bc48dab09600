"""``diffusekit sample``: generate a grid of images from a trained model."""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffusekit.errors import ConfigError, check_positive_int

DESCRIPTION = """\
Generate images from a pixel-space diffusion model and save them as one PNG grid (and optionally as
separate files). MODEL is an inference folder (model_index.json + unet/ + scheduler/, as `diffusekit train`
exports to RUN/model and the reference DDPMPipeline layout), a training run folder, or one of its
checkpoints (EMA weights unless --raw-weights).

Class-conditional models take --class (one id, or one per image); without it they sample unconditionally
with the "no class" id. --guidance S > 1 applies classifier-free guidance (Ho & Salimans 2022):
eps = eps_uncond + S (eps_cond - eps_uncond). The PNG carries the settings as text metadata."""

EPILOG = """\
examples:
  diffusekit sample runs/demo/model --n 64 --out grid.png
  diffusekit sample runs/demo --class 7 --guidance 3 --n 16 --sampler ddpm --steps 1000 --out sevens.png"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample",
        help="generate images from a trained model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="inference folder, run folder or training checkpoint")
    p.add_argument("--n", type=int, default=64, metavar="N", help="number of images (default 64)")
    p.add_argument("--sampler", default="ddim", help="ddim (default), ddpm, euler, euler_ancestral, dpmpp_2m, pndm")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="sampling steps (default 50)")
    p.add_argument("--eta", type=float, metavar="ETA", help="DDIM eta: 0 deterministic (default), 1 = DDPM-like")
    p.add_argument(
        "--class",
        dest="class_labels",
        type=int,
        nargs="+",
        metavar="K",
        help="class id(s): one for all images or one per image",
    )
    p.add_argument("--guidance", type=float, default=1.0, metavar="S", help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="image i uses seed N + i (default 0)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per network batch")
    p.add_argument("--out", default="samples.png", metavar="PNG", help="grid file (default samples.png)")
    p.add_argument("--nrow", type=int, metavar="N", help="images per grid row (default: near-square)")
    p.add_argument("--scale", type=int, default=1, metavar="N", help="enlarge the grid N times (nearest)")
    p.add_argument("--out-dir", metavar="DIR", help="also save every image as DIR/000000.png, ...")
    p.add_argument("--raw-weights", action="store_true", help="use a checkpoint's raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from diffusekit.pipelines.common import generators_from_seeds
    from diffusekit.training.distributed import pick_device
    from diffusekit.training.export import load_for_sampling
    from diffusekit.io.images import save_image_grid, save_images

    check_positive_int("--n", args.n)
    check_positive_int("--batch-size", args.batch_size)
    check_positive_int("--scale", args.scale)
    device = pick_device(args.device)
    pipe = load_for_sampling(args.model, use_ema=not args.raw_weights, device=device)
    labels = args.class_labels
    if labels is not None:
        if len(labels) not in (1, args.n):
            raise ConfigError(f"--class takes one id or --n={args.n} ids, got {len(labels)}")
        if len(labels) == 1:
            labels = labels * args.n
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, args.n, args.batch_size):
        k = min(args.batch_size, args.n - i)
        chunks.append(
            pipe(
                k,
                steps=args.steps,
                sampler=args.sampler,
                eta=args.eta,
                generator=generators_from_seeds(args.seed + i, k),
                class_labels=labels[i : i + k] if labels else None,
                guidance_scale=args.guidance,
            )
        )
    images = torch.cat(chunks)
    settings = {
        "model": str(args.model),
        "sampler": args.sampler,
        "steps": args.steps,
        "seed": args.seed,
        "guidance_scale": args.guidance,
        "class_labels": labels,
        "eta": args.eta,
    }
    path = save_image_grid(
        images, args.out, nrow=args.nrow, scale=args.scale, metadata={"diffusekit": json.dumps(settings)}
    )
    if args.out_dir:
        save_images(images, args.out_dir)
    print(
        f"wrote {args.n} images to {path} ({time.perf_counter() - t0:.1f} s)"
        + (f" and {args.out_dir}/" if args.out_dir else "")
    )
    return 0
