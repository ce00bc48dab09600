"""``diffusekit demo --latent``: the latent-diffusion chain of Rombach et al. 2022 on the bundled digits, end to
end on a CPU: train the KL autoencoder (``diffusekit train-vae``, the mnist-f4 preset: 28x28 -> 7x7x4), train a
class-conditional U-Net on its latents (``diffusekit train --latent``, label dropout for classifier-free
guidance), decode a grid of samples, and report the autoencoder's reconstruction PSNR on held-out digits and
FID as the pixel demo does (``diffusekit.cli.demo_common``), with the autoencoder's own floor beside it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.cli.demo_common import (
    GRID_FILE,
    LATENT_RUN_ENTRIES,
    REPORT_FILE,
    VAE_RUN_ENTRIES,
    check_output_dir,
    check_shared_options,
    clear_runs,
    fid_available,
    grid_of_samples,
    heldout_fid,
    print_report,
    save_grid,
    unet_sections,
    write_report,
)
from diffusekit.cli.train_common import check_options, set_cpu_threads
from diffusekit.limits import check_int

DESCRIPTION = """\
With --latent, the latent-diffusion chain instead (Rombach et al. 2022): trains the KL autoencoder on the
same digits (train-vae's mnist-f4 preset, 28x28 -> 7x7x4 latents, L1 + 1e-6 KL, --vae-steps steps of
--vae-batch-size), measures its reconstruction PSNR on --psnr-images held-out digits (reconstructions.png:
originals | reconstructions), trains a class-conditional U-Net on its latents (train --latent; the latent-7x7
preset, ~2.2M parameters, label dropout 0.1 for classifier-free guidance), samples the 10-column grid with
DDIM and decodes it, and reports FID as above plus the FID of the same real training digits passed through the
autoencoder (the floor a latent model can reach). Run folders: DIR/autoencoder (its VAE folder in
autoencoder/vae) and DIR/train (the pipeline folder in train/model, which 'diffusekit sample' loads).

Measured at these defaults on an idle 2-core AMD EPYC (Zen 4): 14 min 52 s in all (autoencoder 173 s, U-Net
600 s, grid 6 s). How the steps were sized, before that measurement: on a shared 2-core machine at load
average 5-7, 20-step runs with two threads printed 0.4 autoencoder steps/s and 0.17 U-Net steps/s (start-up
included, and a first, wider latent-7x7); longer runs with one thread took 0.3-0.6 s per autoencoder step of
32, 0.5-1.6 s per latent-7x7 step of 64 (depending on the other work) and 13-22 s for the 100-sample grid,
where the pixel demo's step of 64 (0.65 s on idle cores) took ~4.9 s. Scaled by that ratio, 1,000 autoencoder
steps (~1-2 minutes), 2,000 U-Net steps (~3-9 minutes), encoding the 20,000 latents (<1 minute), sampling (<1
minute) and the Inception features (~3 minutes on the first run, ~1 later) make 10-20 minutes on 2 idle cores.
After 300 autoencoder and 1,000 U-Net steps most samples were already recognisable digits of their column's
class. --vae-max-minutes and --max-minutes cap the two trainings."""

EPILOG = """\
  diffusekit demo --latent                                 # the latent-diffusion chain (scripts/main.sh --latent)
  diffusekit demo --latent --no-fid --vae-steps 200 --steps 200   # a quick look at the chain"""

DEFAULTS: dict[str, Any] = {"steps": 2000, "preset": "latent-7x7", "output_dir": "runs/demo-latent",
                            "preconditioning": "none"}  # fmt: skip
VAE_DEFAULTS: dict[str, Any] = {"vae_steps": 1000, "vae_batch_size": 32, "vae_lr": 1e-3, "psnr_images": 500}
LATENT_ONLY = ("vae_steps", "vae_max_minutes", "vae_batch_size", "vae_lr", "psnr_images")
VAE_PRESET = "mnist-f4"
RUNS = {"autoencoder": VAE_RUN_ENTRIES, "train": LATENT_RUN_ENTRIES}
RECONSTRUCTIONS_FILE = "reconstructions.png"
SHOWN_RECONSTRUCTIONS = 50  # digits in reconstructions.png (5 rows of originals above 5 of reconstructions)
HELDOUT = 2000  # held-out digits in the bundled subset


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of the latent demo alone (errors without --latent)."""
    g = p.add_argument_group("latent demo (with --latent)")
    d = VAE_DEFAULTS
    g.add_argument("--vae-steps", type=int, metavar="N", help=f"autoencoder training steps (default {d['vae_steps']})")
    g.add_argument("--vae-max-minutes", type=float, metavar="M",
                   help="stop the autoencoder's training after M minutes (default: none)")  # fmt: skip
    g.add_argument("--vae-batch-size", type=int, metavar="N",
                   help=f"autoencoder training batch (default {d['vae_batch_size']})")  # fmt: skip
    g.add_argument("--vae-lr", type=float, metavar="LR",
                   help=f"the autoencoder's AdamW learning rate (default {d['vae_lr']:g})")  # fmt: skip
    g.add_argument("--psnr-images", type=int, metavar="N",
                   help=f"held-out digits the reconstruction PSNR is measured on (default {d['psnr_images']}, at "
                        f"most {HELDOUT})")  # fmt: skip


def check_latent_options(args: argparse.Namespace) -> None:
    """The latent demo's own options (defaults filled in), checked before anything is written or trained."""
    for name, value in VAE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_options(args, ("vae_steps", "vae_max_minutes", "vae_batch_size", "vae_lr"))  # as --steps, --lr, ...
    check_int("--psnr-images", args.psnr_images, 1, HELDOUT)


def vae_config(args: argparse.Namespace, out: Path):
    """The autoencoder run: train-vae's defaults (L1 + 1e-6 KL, posterior samples, EMA 0.999) on the digits."""
    from diffusekit.training.vae_train_config import VAETrainConfig

    return VAETrainConfig().replace(
        data={"source": "bundled", "limit": args.limit},
        vae={"preset": VAE_PRESET},
        optim={"lr": args.vae_lr, "batch_size": args.vae_batch_size, "warmup_steps": 100},
        run={"output_dir": str(out / "autoencoder"), "max_steps": args.vae_steps,
             "max_minutes": args.vae_max_minutes, "seed": args.seed, "checkpoint_every": 500, "log_every": 10,
             "sample_every": 500, "progress": not args.no_progress, "tensorboard": True},
    )  # fmt: skip


def latent_config(args: argparse.Namespace, out: Path, vae_folder: Path):
    """The latent U-Net run: the pixel demo's settings (``unet_sections``) on the latents of ``vae_folder``,
    class-conditional, with the latent trainer's own schedule (scaled-linear betas, as Stable Diffusion)."""
    from diffusekit.training.latent_config import LatentTrainConfig

    return LatentTrainConfig().replace(
        **unet_sections(args, out / "train"), latent={"vae": str(vae_folder), "conditioning": "class"}
    )


def reconstruction_psnr(reconstruct, n: int) -> tuple[float, Tensor, Tensor]:  # noqa: ANN001 - [-1, 1] -> [0, 1]
    """Mean PSNR (dB, on [0, 1] images) of the first ``n`` held-out digits and their reconstructions; also
    returns both image sets (n, 1, 28, 28) in [0, 1]."""
    from diffusekit.evaluation.sr_metrics import psnr
    from diffusekit.training.data import DataSpec, from_model_range, load_dataset

    test = load_dataset(DataSpec(source="bundled", split="test", limit=n))
    x = test.batch(range(len(test)))[0]  # (n, 1, 28, 28) in [-1, 1]
    rec = torch.cat([reconstruct(x[i : i + 250]) for i in range(0, n, 250)])
    original = from_model_range(x)
    return float(psnr(rec, original).mean()), original, rec


def run(args: argparse.Namespace) -> int:
    """The chain (see the module docstring); writes DIR/samples.png, DIR/reconstructions.png, DIR/report.json."""
    from diffusekit.training.data import from_model_range
    from diffusekit.training.latent_trainer import LatentTrainer
    from diffusekit.training.vae_trainer import VAETrainer

    check_shared_options(args)
    check_latent_options(args)
    out = check_output_dir(args.output_dir, RUNS, (GRID_FILE, RECONSTRUCTIONS_FILE, REPORT_FILE))
    set_cpu_threads(args)
    clear_runs(out, RUNS)
    with_fid = fid_available(args)
    t_all = time.perf_counter()
    report: dict[str, Any] = {"demo": "latent", "torch_threads": torch.get_num_threads()}

    # 1. the autoencoder
    vae_trainer = VAETrainer(vae_config(args, out))
    vae_run = vae_trainer.fit()
    std, factor = vae_trainer.last_scaling or (float("nan"), float("nan"))
    f = vae_trainer.vae_config.downsample_factor
    side = vae_trainer.dataset.resolution // f
    report.update(vae_steps=vae_run.step, vae_train_seconds=round(vae_run.train_seconds, 1),
                  vae_final_loss=vae_run.loss, vae=str(vae_run.export_dir),
                  latent_shape=f"{vae_trainer.vae_config.latent_channels}x{side}x{side}", latent_std=round(std, 4),
                  scaling_factor=round(factor, 5))  # fmt: skip

    def reconstruct(x: Tensor) -> Tensor:
        return from_model_range(vae_trainer.reconstruct(x).cpu())

    value, original, rec = reconstruction_psnr(reconstruct, args.psnr_images)
    k = min(SHOWN_RECONSTRUCTIONS, args.psnr_images)
    settings = {"columns": "held-out digits: originals above, reconstructions below", "demo": "latent"}
    shown = save_grid(torch.cat([original[:k], rec[:k]]), out / RECONSTRUCTIONS_FILE, settings)
    report.update(psnr_heldout_db=round(value, 2), psnr_images=args.psnr_images, reconstructions=str(shown))

    # 2. the U-Net on the autoencoder's latents
    trainer = LatentTrainer(latent_config(args, out, vae_run.export_dir))
    result = trainer.fit()
    report.update(steps=result.step, train_seconds=round(result.train_seconds, 1), final_loss=result.loss,
                  images_seen=result.step * args.batch_size, model=str(result.export_dir))  # fmt: skip

    # 3. the grid and FID
    def sample(n: int, seed: int, guidance: float) -> Tensor:  # column j of a 10-wide grid: class j
        return trainer.sample(n, seed=seed, steps=args.sample_steps, guidance_scale=guidance)

    report.update(grid_of_samples(sample, out, args))
    if with_fid:
        report.update(heldout_fid(lambda n, seed: sample(n, seed, args.fid_guidance), args, reconstruct=reconstruct))
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_report(out, report)
    print_report(report, "diffusekit demo --latent")
    return 0
