"""Latent against pixel diffusion benchmark (not a test): Fashion-MNIST, class-conditional, the same total
wall-clock budget for each side (Rombach et al. 2022's argument, sec. 1 and 4.1: diffusion in the latent space
of a pretrained autoencoder reaches a given quality with less compute than in pixel space).

* latent: ``diffusekit train-vae`` (the mnist-f4 autoencoder, 28x28 -> 7x7x4) for ``--vae-share`` of the
  budget, the latents of the 60,000 training images encoded once, then ``diffusekit train --latent`` (the
  latent-7x7 U-Net, label dropout 0.1) for what is left of the budget. The autoencoder's training, its
  scaling-factor measurement and the encoding all count against the budget;
* pixel: ``diffusekit train`` of a class-conditional U-Net of similar size (mnist-small widened to
  ``--pixel-channels``, 2.5M parameters against the latent U-Net's 2.15M plus the 0.59M decoder) for the
  whole budget.

Both use the demo's settings otherwise (AdamW 1e-3, batch 64, 200 warmup steps, Min-SNR-5, EMA 0.999, each
side's usual noise schedule: linear betas in pixels, scaled-linear on latents) and are sampled through their
exported model folders as ``diffusekit sample`` does (DDIM, ``--sample-steps``, class i at image i mod 10).
Reported: FID of ``--samples`` images against the Fashion-MNIST test set (``evaluation.features``; the test
statistics are cached), next to the FID of as many real training images (the floor at that sample size) and of
those images through the autoencoder (the floor the latent model can reach); samples per second at generation;
the autoencoder's reconstruction PSNR on ``--samples`` test images; steps, seconds and load average. Writes
``latent_fashion.json`` (``bench.harness.write_report``) and one 10x10 grid per side (one class per column)
plus ``latent_fashion_reconstructions.png`` (test images above, reconstructions below) into ``--results``.

``--captions``: text-conditional latent diffusion on the digits instead: the same chain on ``--digits``
(default: the bundled MNIST subset) with the caption "a handwritten zero" ... "a handwritten nine" made from
each label (``latent.class_captions``), the text encoder trained from scratch on a BPE vocabulary of those
captions; writes ``latent_captions.json`` and ``latent_captions.png``: one row per prompt (in order), columns
are seeds.

    python benchmarks/latent_fashion.py                         # 45 minutes per side, then sampling and FID
    python benchmarks/latent_fashion.py --captions --budget-minutes 20
    python benchmarks/latent_fashion.py --budget-minutes 0.5 --samples 50 --fid-reference 100 --sample-steps 10 \\
        --results /tmp/latent --output-dir /tmp/latent/runs    # a smoke test of the script (~10 minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.bench import harness
from diffusekit.bench.timing import load_averages
from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
from diffusekit.evaluation.fid import fid_from_stats
from diffusekit.evaluation.sr_metrics import psnr
from diffusekit.io.images import save_image_grid
from diffusekit.io.models import load_vae
from diffusekit.pipelines import unconditional
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import DATASETS_ENV, DataSpec, default_random_flip, from_model_range, load_dataset
from diffusekit.training.latent_cache import load_or_build, vae_fingerprint
from diffusekit.training.latent_config import LatentTrainConfig
from diffusekit.training.latent_trainer import LatentTrainer
from diffusekit.training.trainer import Trainer
from diffusekit.training.vae_train_config import VAETrainConfig
from diffusekit.training.vae_trainer import VAETrainer

ROOT = Path(__file__).resolve().parents[1]
EVAL_BATCH = 250
GRID_COLUMNS = 10
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MIN_MINUTES = 0.05  # the latent U-Net always gets a few seconds, even when the autoencoder used up the budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=45.0,
                   help="wall-clock training budget of EACH side, the latent side's autoencoder and encoding "
                        "included (default 45)")  # fmt: skip
    p.add_argument("--vae-share", type=float, default=0.3,
                   help="fraction of the latent side's budget for the autoencoder (default 0.3)")  # fmt: skip
    p.add_argument("--samples", type=int, default=2000, help="images generated per side and scored (default 2000)")
    p.add_argument("--fid-reference", type=int, metavar="N",
                   help="FID reference: the first N test images (default: all 10,000; cached)")  # fmt: skip
    p.add_argument("--captions", action="store_true",
                   help="text-conditional latent diffusion on the digits instead (see above)")  # fmt: skip
    p.add_argument("--digits", default="bundled", help="--captions: the digit data (default bundled; or mnist)")
    p.add_argument("--guidance", type=float, default=3.0, help="--captions: classifier-free guidance (default 3)")
    p.add_argument("--output-dir", default="runs/latent_fashion", help="training runs go here")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for the JSON report and the grids (default benchmarks/results)")  # fmt: skip
    p.add_argument("--data-root", help="folder holding fashion-mnist/ (default: the places diffusekit train looks)")
    p.add_argument("--latent-preset", default="latent-7x7", help="U-Net preset on the latents (default latent-7x7)")
    p.add_argument("--vae-preset", default="mnist-f4", help="autoencoder preset (default mnist-f4)")
    p.add_argument("--pixel-preset", default="mnist-small", help="pixel U-Net preset (default mnist-small)")
    p.add_argument("--pixel-channels", type=int, nargs="+", default=[48, 96, 96],
                   help="channels of the pixel U-Net's levels (default 48 96 96: the latent side's size)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cpu-threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.budget_minutes > 0:
        p.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if not 0 < args.vae_share < 1:
        p.error(f"--vae-share must be in (0, 1), got {args.vae_share}")
    if args.samples < GRID_COLUMNS:
        p.error(f"--samples must be at least {GRID_COLUMNS} (a grid row), got {args.samples}")
    return args


def unet_sections(args: argparse.Namespace, source: str, run_dir: Path, minutes: float) -> dict[str, dict]:
    """The settings both U-Nets share (those of ``diffusekit demo``), trained for ``minutes``."""
    return {
        "data": {"source": source, "data_root": args.data_root},
        "diffusion": {"label_dropout": 0.1, "min_snr_gamma": 5.0},
        "optim": {"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 200},
        "ema": {"decay": 0.999},
        "run": {"output_dir": str(run_dir), "max_steps": 10**9, "max_minutes": minutes, "seed": args.seed,
                "checkpoint_every": 10**9, "log_every": 20, "tensorboard": False},
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------- training
def train_pixel(args: argparse.Namespace) -> dict[str, Any]:
    sections = unet_sections(args, "fashion-mnist", Path(args.output_dir) / "pixel", args.budget_minutes)
    sections["model"] = {"preset": args.pixel_preset, "class_conditional": True,
                         "overrides": {"channels": list(args.pixel_channels)}}  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig().replace(**sections))
    result = trainer.fit()
    return {"steps": result.step, "train_seconds": round(result.train_seconds, 1),
            "side_seconds": round(time.perf_counter() - t0, 1), "final_loss": result.loss,
            "params_unet_M": _millions(trainer.model), "model": str(result.export_dir)}  # fmt: skip


def train_latent(args: argparse.Namespace, source: str, captions: list[str] | None = None) -> dict[str, Any]:
    """The autoencoder for ``--vae-share`` of the budget, the latents encoded once, the U-Net for the rest."""
    out = Path(args.output_dir) / ("captions" if captions else "latent")
    t0 = time.perf_counter()
    vae_config = VAETrainConfig().replace(
        data={"source": source, "data_root": args.data_root},
        vae={"preset": args.vae_preset},
        optim={"lr": args.vae_lr, "batch_size": args.vae_batch_size, "warmup_steps": 100},
        run={"output_dir": str(out / "autoencoder"), "max_steps": 10**9,
             "max_minutes": args.vae_share * args.budget_minutes, "seed": args.seed, "checkpoint_every": 10**9,
             "log_every": 20, "sample_every": 0, "tensorboard": False},
    )  # fmt: skip
    vae_trainer = VAETrainer(vae_config)
    vae_run = vae_trainer.fit()
    vae_seconds = time.perf_counter() - t0
    # the latent trainer's own cache, built here so that its time is known before the U-Net's budget is set
    cache = out / "latents.safetensors"
    ds = load_dataset(DataSpec(source=source, data_root=args.data_root))
    t = time.perf_counter()
    load_or_build(cache, load_vae(vae_run.export_dir, device=vae_trainer.env.device), ds,
                  vae_key=vae_fingerprint(vae_run.export_dir), flips=default_random_flip(source),
                  device=vae_trainer.env.device)  # fmt: skip
    encode_seconds = time.perf_counter() - t
    minutes = max(MIN_MINUTES, args.budget_minutes - (time.perf_counter() - t0) / 60)
    sections = unet_sections(args, source, out / "train", minutes)
    sections["model"] = {"preset": args.latent_preset, "class_conditional": captions is None}
    latent = {"vae": str(vae_run.export_dir), "cache": str(cache)}
    latent.update({"conditioning": "text", "class_captions": captions} if captions else {"conditioning": "class"})
    trainer = LatentTrainer(LatentTrainConfig().replace(**sections, latent=latent))
    result = trainer.fit()
    std, factor = vae_trainer.last_scaling or (float("nan"), float("nan"))
    return {
        "vae": {"steps": vae_run.step, "train_seconds": round(vae_run.train_seconds, 1),
                "seconds_with_export": round(vae_seconds, 1), "final_loss": vae_run.loss,
                "params_M": _millions(vae_trainer.ema.vae), "params_decoder_M": _millions(vae_trainer.ema.vae.decoder),
                "latent_std": round(std, 4), "scaling_factor": round(factor, 5), "folder": str(vae_run.export_dir)},
        "encode_seconds": round(encode_seconds, 1),
        "unet": {"steps": result.step, "train_seconds": round(result.train_seconds, 1), "budget_minutes": minutes,
                 "final_loss": result.loss, "params_M": _millions(trainer.model.unet)},
        "side_seconds": round(time.perf_counter() - t0, 1),
        "model": str(result.export_dir),
        "vae_trainer": vae_trainer,
    }  # fmt: skip


def _millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


# ----------------------------------------------------------------------------------------------- evaluation
def generate(folder: str, n: int, args: argparse.Namespace) -> tuple[Tensor, float]:
    """n class-conditional samples (class i at image i mod 10) from an exported folder, loaded as ``diffusekit
    sample`` loads it; returns them in [0, 1] and the seconds the sampling took (not the loading)."""
    pipe = unconditional.load_pipeline(folder)
    t = time.perf_counter()
    parts = []
    for i in range(0, n, EVAL_BATCH):
        k = min(EVAL_BATCH, n - i)
        labels = (torch.arange(i, i + k) % 10).tolist()
        parts.append(pipe(k, steps=args.sample_steps, sampler="ddim", class_labels=labels,
                          generator=torch.Generator().manual_seed(args.seed + 1 + i), show_progress=False))  # fmt: skip
    return torch.cat(parts).float().cpu(), time.perf_counter() - t


def reconstruct(vae_trainer: VAETrainer, x: Tensor) -> Tensor:
    """[-1, 1] images -> [0, 1] reconstructions by the exported (EMA) autoencoder, in evaluation batches."""
    return torch.cat([from_model_range(vae_trainer.reconstruct(x[i : i + EVAL_BATCH]).cpu())
                      for i in range(0, x.shape[0], EVAL_BATCH)])  # fmt: skip


def class_grid(images: Tensor, path: Path) -> Path:
    """The first rows of 10 (class i in column i) as one grid."""
    rows = min(10, images.shape[0] // GRID_COLUMNS)
    return save_image_grid(images[: rows * GRID_COLUMNS], path, nrow=GRID_COLUMNS, scale=2)


def fashion(args: argparse.Namespace) -> dict[str, Any]:
    n = args.samples
    pixel = train_pixel(args)
    latent = train_latent(args, "fashion-mnist")
    vae_trainer = latent.pop("vae_trainer")

    images, seconds = {}, {}
    for side, run in (("pixel", pixel), ("latent", latent)):
        images[side], seconds[side] = generate(run["model"], n, args)
        class_grid(images[side], args.results / f"latent_fashion_{side}.png")
    test = load_dataset(DataSpec(source="fashion-mnist", split="test", data_root=args.data_root, limit=n))
    x_test = test.batch(range(len(test)))[0]  # (n, 1, 28, 28) in [-1, 1]
    rec_test = reconstruct(vae_trainer, x_test)
    truth = from_model_range(x_test)
    psnr_db = float(psnr(rec_test, truth).mean())
    k = min(50, n)
    save_image_grid(torch.cat([truth[:k], rec_test[:k]]), args.results / "latent_fashion_reconstructions.png",
                    nrow=GRID_COLUMNS, scale=2)  # fmt: skip
    train = load_dataset(DataSpec(source="fashion-mnist", data_root=args.data_root, limit=n))
    x_train = train.batch(range(len(train)))[0]

    t = time.perf_counter()
    extractor = InceptionFeatures()
    reference = dataset_stats("fashion-mnist", "test", extractor, limit=args.fid_reference)

    def fid(x: Tensor, what: str) -> float:
        stats = extractor.stats(tensor_batches(x), x.shape[0], f"features of {what}")
        return round(fid_from_stats(stats, reference), 3)

    fids = {
        "pixel": fid(images["pixel"], "pixel samples"),
        "latent": fid(images["latent"], "latent samples"),
        "autoencoder_reconstructions_of_train": fid(reconstruct(vae_trainer, x_train), "reconstructions"),
        "real_train": round(fid_from_stats(dataset_stats("fashion-mnist", "train", extractor, limit=n), reference), 3),
    }  # fmt: skip
    return {
        "training": {"pixel": pixel, "latent": latent, "batch_size": args.batch_size},
        "sampling": {
            side: {"seconds": round(s, 2), "samples_per_second": round(n / s, 2)} for side, s in seconds.items()
        },  # fmt: skip
        "sampler": f"ddim, {args.sample_steps} steps",
        "vae_reconstruction_psnr_db_test": round(psnr_db, 3),
        "fid": fids,
        "fid_samples": n,
        "fid_reference_images": args.fid_reference or 10000,
        "feature_seconds": round(time.perf_counter() - t, 1),
    }


def captioned_digits(args: argparse.Namespace) -> dict[str, Any]:
    prompts = [f"a handwritten {name}" for name in DIGIT_NAMES]
    latent = train_latent(args, args.digits, captions=prompts)
    vae_trainer = latent.pop("vae_trainer")
    sd = load_pipeline(latent["model"])
    size = vae_trainer.dataset.resolution
    t = time.perf_counter()
    rows = []
    for i, prompt in enumerate(prompts):  # one row per prompt, one column per seed
        seeds = [torch.Generator().manual_seed(args.seed + 1 + 100 * i + j) for j in range(GRID_COLUMNS)]
        out = TextToImage(sd)([prompt] * GRID_COLUMNS, height=size, width=size, steps=args.sample_steps,
                              sampler="ddim", guidance_scale=args.guidance, generator=seeds,
                              show_progress=False)  # fmt: skip
        rows.append(out.images)
    seconds = time.perf_counter() - t
    grid = save_image_grid(torch.cat(rows).float().cpu(), args.results / "latent_captions.png", nrow=GRID_COLUMNS,
                           scale=2)  # fmt: skip
    return {
        "training": latent,
        "prompts": prompts,
        "grid": str(grid),
        "grid_layout": "one row per prompt in order, one column per seed",
        "guidance": args.guidance,
        "sampling": {"seconds": round(seconds, 2), "samples_per_second": round(len(rows) * GRID_COLUMNS / seconds, 2)},
        "sampler": f"ddim, {args.sample_steps} steps",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.data_root:  # dataset_stats finds the test set through the usual places, this one first
        os.environ[DATASETS_ENV] = args.data_root
    load_before = load_averages()
    body = captioned_digits(args) if args.captions else fashion(args)
    report = {
        "machine": harness.machine(),
        "load_average_before": load_before,
        "load_average_after": load_averages(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **body,
    }
    name = "latent_captions.json" if args.captions else "latent_fashion.json"
    harness.write_report(args.results / name, report)
    print(table(report) if not args.captions else f"wrote {args.results / name} and {body['grid']}", file=sys.stderr)


def table(report: dict[str, Any]) -> str:
    """The Fashion-MNIST comparison as a markdown table."""
    tr, fid, s = report["training"], report["fid"], report["sampling"]
    p, lat = tr["pixel"], tr["latent"]
    n = report["fid_samples"]
    return "\n".join([
        f"Fashion-MNIST, {report['settings']['budget_minutes']} minutes per side, {n} samples "
        f"({report['sampler']}), FID vs {report['fid_reference_images']} test images; load average "
        f"{report['load_average_before']} before, {report['load_average_after']} after",
        "",
        "| side | training | parameters | FID | samples/s |",
        "|---|---|---|---|---|",
        f"| pixel | {p['steps']} U-Net steps in {p['train_seconds']:.0f} s | {p['params_unet_M']}M | "
        f"{fid['pixel']:.2f} | {s['pixel']['samples_per_second']:.1f} |",
        f"| latent | autoencoder {lat['vae']['steps']} steps in {lat['vae']['train_seconds']:.0f} s, encoding "
        f"{lat['encode_seconds']:.0f} s, U-Net {lat['unet']['steps']} steps in {lat['unet']['train_seconds']:.0f} s "
        f"| {lat['unet']['params_M']}M + {lat['vae']['params_decoder_M']}M decoder | {fid['latent']:.2f} | "
        f"{s['latent']['samples_per_second']:.1f} |",
        f"| autoencoder reconstructions of {n} training images | PSNR {report['vae_reconstruction_psnr_db_test']:.2f}"
        f" dB on {n} test images | | {fid['autoencoder_reconstructions_of_train']:.2f} | |",
        f"| the same {n} real training images (floor) | | | {fid['real_train']:.2f} | |",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
