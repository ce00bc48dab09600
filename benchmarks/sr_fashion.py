"""Super-resolution benchmark (not a test): Fashion-MNIST 7x7 -> 28x28 (x4), the SR3 comparison (Saharia et al.
2021, "Image Super-Resolution via Iterative Refinement", sec. 5): bicubic interpolation, a plain regression U-Net
and the diffusion upscaler, the two networks of the same size trained for the same wall-clock budget.

* diffusion: ``diffusekit train --task super-resolution --scale 4`` on the 60,000 training images (the trainer
  itself, ``Trainer``), sampled through its exported model folder (``load_sr_pipeline``) as
  ``diffusekit upscale`` would;
* regression: the same U-Net config with the conditioning image as its only input (C instead of 2 C input
  channels, no class table, timestep fixed at 0), trained to output the high-resolution image directly with
  an L2 (or L1) loss. Its loop is below and reuses the trainer's parts: the same data stream and seed, the
  same degradation, AdamW settings, warmup, gradient clipping, EMA and mixed precision; it is no task of the
  trainer because that trainer's loss path is the diffusion one (noise draws, timesteps, targets);
* bicubic: the conditioning image itself (the low-resolution input upsampled by bicubic interpolation).

The inputs are the first N test images made 4 times smaller as the trainer makes them (antialiased
bicubic). Reported for each: PSNR and SSIM against the ground truth (``evaluation.sr_metrics``), the
consistency error (MSE on the [0, 1] scale between the output made 4 times smaller the same way and the
input), and FID against the Fashion-MNIST test set (Inception features of ``evaluation.features``; the
test-set statistics are cached), with the FID of the N ground-truth images as the floor; the training and
sampling seconds and the load average before and after. Writes ``sr_fashion.json`` (through
``bench.harness.write_report``) and ``sr_fashion_strip.png`` (low-res | bicubic | regression | diffusion |
ground truth, 8 rows) into ``--results``, and prints a markdown table.

    python benchmarks/sr_fashion.py --train-minutes 30 --output-dir runs/sr_fashion [--cpu-threads 2]
    python benchmarks/sr_fashion.py --train-minutes 0.5 --samples 64 --fid-reference 500 --results /tmp/sr
        # a smoke test of the script (minutes)

The full run trains for twice ``--train-minutes`` (one budget per network), then samples N images with
``--sample-steps`` sampler steps and computes Inception features of 5 N images (plus the 10,000 test
images on the first run); on 2 CPU cores the last two take longer than the training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.bench import harness
from diffusekit.bench.timing import load_averages
from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
from diffusekit.evaluation.fid import FeatureStats, fid_from_stats
from diffusekit.evaluation.sr_metrics import consistency_error, psnr, ssim
from diffusekit.io.images import save_image_grid
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.super_resolution import load_sr_pipeline, upsample_condition
from diffusekit.runtime.policy import Plan, prepare
from diffusekit.samplers.config import SAMPLERS
from diffusekit.training.batches import StreamBatchSampler, make_batches
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import DATASETS_ENV, DataSpec, from_model_range, load_dataset
from diffusekit.training.ema import ema_decay, ema_update, make_ema
from diffusekit.training.lr_schedule import lr_factor
from diffusekit.training.precision import resolve_precision
from diffusekit.training.super_resolution import degrade
from diffusekit.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SCALE = 4
STRIP_ROWS = 8
EVAL_BATCH = 250
METHODS = ("bicubic", "regression", "diffusion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-minutes", type=float, default=30.0,
                   help="wall-clock training budget of EACH network (default 30)")  # fmt: skip
    p.add_argument("--train-steps", type=int,
                   help="train EACH network for exactly this many optimizer steps instead of --train-minutes (the "
                   "two networks cost the same per step, so equal steps is equal compute on a machine whose load "
                   "varies)")  # fmt: skip
    p.add_argument("--samples", type=int, default=2000, help="test images upscaled and scored (default 2000)")
    p.add_argument("--output-dir", default="runs/sr_fashion", help="training runs go here")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for sr_fashion.json and sr_fashion_strip.png (default benchmarks/results)")  # fmt: skip
    p.add_argument("--data-root", help="folder holding fashion-mnist/ (default: the places diffusekit train looks)")
    p.add_argument("--preset", default="mnist-small", help="U-Net preset of both networks (default mnist-small)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--regression-loss", choices=("l2", "l1"), default="l2")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="diffusion sampler (default ddim)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--fid-reference", type=int, metavar="N",
                   help="FID reference: the first N test images (default: all 10,000; cached)")  # fmt: skip
    p.add_argument("--cpu-threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.samples < STRIP_ROWS:
        p.error(f"--samples must be at least {STRIP_ROWS} (the strip's rows), got {args.samples}")
    if not args.train_minutes > 0:
        p.error(f"--train-minutes must be positive, got {args.train_minutes}")
    if args.train_steps is not None and args.train_steps < 1:
        p.error(f"--train-steps must be at least 1, got {args.train_steps}")
    return args


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The diffusion upscaler's run; the regression baseline copies its optimiser, EMA and data settings."""
    return TrainConfig().replace(
        data={"source": "fashion-mnist", "data_root": args.data_root},
        model={"preset": args.preset},
        task={"kind": "super-resolution", "scale": SCALE, "downsample": "bicubic"},
        optim={"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": args.warmup_steps},
        ema={"decay": args.ema_decay},
        run={"output_dir": str(Path(args.output_dir) / "diffusion"), "max_steps": args.train_steps or 10**9,
             "max_minutes": None if args.train_steps else args.train_minutes, "checkpoint_every": 10**9,
             "seed": args.seed, "log_every": 20,
             "tensorboard": False},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- regression
class Regression:
    """A U-Net mapping the conditioning image (B, C, H, W) straight to the high-resolution image: the
    diffusion upscaler's network with C input channels and the timestep held at 0."""

    def __init__(self, trainer: Trainer) -> None:
        self.config, self.device = trainer.config, trainer.env.device
        uc = dataclasses.replace(trainer.unet_config, in_channels=trainer.unet_config.out_channels, num_classes=None)
        torch.manual_seed(self.config.run.seed)
        plan = Plan(dtype=torch.float32, channels_last=self.device.type == "cpu", inference=False)
        self.model = prepare(UNet(uc), plan, device=self.device)
        self.ema = make_ema(self.model)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def __call__(self, net: torch.nn.Module, cond: Tensor) -> Tensor:
        cond = cond.to(self.device).contiguous(memory_format=self.memory_format)
        return net(cond, torch.zeros(cond.shape[0], dtype=torch.long, device=self.device))

    def fit(self, dataset: Any, minutes: float, loss_name: str, steps: int | None = None) -> dict[str, Any]:
        """Train for ``minutes`` of wall clock (or exactly ``steps`` steps) on the trainer's data stream; returns
        steps, seconds, last loss."""
        c = self.config
        o = c.optim
        opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        autocast = resolve_precision(c.run.mixed_precision, self.device)
        amp = torch.autocast(self.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        sampler = StreamBatchSampler(len(dataset), o.batch_size, c.run.seed)
        batches = make_batches(dataset, sampler)
        loss_fn = F.mse_loss if loss_name == "l2" else F.l1_loss
        clip = o.grad_clip_norm if o.grad_clip_norm is not None else math.inf
        step, losses, start = 0, [], time.perf_counter()
        while (step < steps) if steps else (time.perf_counter() - start < minutes * 60):
            for group in opt.param_groups:
                group["lr"] = o.lr * lr_factor(step, o, c.run.max_steps)
            x0 = next(batches)[0].to(self.device)  # (B, C, H, W) in [-1, 1]
            cond = upsample_condition(degrade(x0, c.task), SCALE)
            with amp:
                out = self(self.model, cond)
            loss = loss_fn(out.float(), x0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            ema_update(self.ema, self.model, ema_decay(step, c.ema.decay, c.ema.warmup))
            losses.append(float(loss.detach()))
            if step % 100 == 0:
                print(f"regression: step {step}, loss {sum(losses[-100:]) / 100:.5f}", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        tail = losses[-20:]
        return {"steps": step, "seconds": round(seconds, 1), "final_loss": sum(tail) / max(1, len(tail)),
                "loss": loss_name}  # fmt: skip

    @torch.inference_mode()
    def upscale(self, low01: Tensor) -> Tensor:
        """(B, C, h, w) in [0, 1] -> (B, C, 4h, 4w) in [0, 1] from the EMA weights."""
        out = [self(self.ema, upsample_condition(2 * low01[i : i + EVAL_BATCH] - 1, SCALE)).float().cpu()
               for i in range(0, low01.shape[0], EVAL_BATCH)]  # fmt: skip
        return from_model_range(torch.cat(out))


# ----------------------------------------------------------------------------------------------- evaluation
def diffusion_upscale(pipe: Any, low01: Tensor, steps: int, sampler: str, seed: int) -> Tensor:
    """(N, C, h, w) in [0, 1] -> the diffusion upscaler's (N, C, 4h, 4w) in [0, 1], in batches of EVAL_BATCH,
    batch i seeded with seed + 1 + i (so a run of the first M images draws the same noise for them)."""
    parts = []
    for i in range(0, low01.shape[0], EVAL_BATCH):
        g = torch.Generator().manual_seed(seed + 1 + i)
        parts.append(pipe(low01[i : i + EVAL_BATCH], steps=steps, sampler=sampler, generator=g,
                          show_progress=False).images.float().cpu())  # fmt: skip
    return torch.cat(parts).clamp(0, 1)


def scores(out: Tensor, truth: Tensor, low01: Tensor) -> dict[str, float]:
    """Means over the images: PSNR (dB), SSIM, consistency error (bicubic x1/4, MSE on [0, 1])."""
    return {
        "psnr_db": float(psnr(out, truth).mean()),
        "ssim": float(ssim(out, truth).mean()),
        "consistency_mse": float(consistency_error(out, low01, mode="bicubic").mean()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.data_root:  # dataset_stats finds the test set through the usual places, this one first
        os.environ[DATASETS_ENV] = args.data_root
    load_before = load_averages()
    config = train_config(args)

    trainer = Trainer(config)
    diffusion_run = trainer.fit()
    regression = Regression(trainer)
    regression_run = regression.fit(trainer.dataset, args.train_minutes, args.regression_loss, args.train_steps)

    n = args.samples
    test = load_dataset(DataSpec(source="fashion-mnist", split="test", data_root=args.data_root, limit=n))
    x0 = test.batch(range(len(test)))[0]  # (N, 1, 28, 28) in [-1, 1]
    truth = from_model_range(x0)
    low01 = from_model_range(degrade(x0, config.task))  # (N, 1, 7, 7), what a user would hand in
    outputs, seconds = {}, {}
    t = time.perf_counter()
    outputs["bicubic"] = from_model_range(upsample_condition(2 * low01 - 1, SCALE))
    seconds["bicubic"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs["regression"] = regression.upscale(low01)
    seconds["regression"] = time.perf_counter() - t
    pipe = load_sr_pipeline(diffusion_run.export_dir, device=trainer.env.device)
    t = time.perf_counter()
    outputs["diffusion"] = diffusion_upscale(pipe, low01, args.sample_steps, args.sampler, args.seed)
    seconds["diffusion"] = time.perf_counter() - t

    strip = torch.stack([F.interpolate(low01[:STRIP_ROWS], scale_factor=SCALE, mode="nearest"),
                         *(outputs[m][:STRIP_ROWS] for m in METHODS), truth[:STRIP_ROWS]], dim=1)  # fmt: skip
    strip_path = save_image_grid(strip.flatten(0, 1), args.results / "sr_fashion_strip.png", nrow=5, scale=4)

    t = time.perf_counter()
    extractor = InceptionFeatures()
    reference = dataset_stats("fashion-mnist", "test", extractor, limit=args.fid_reference)

    def fid(images: Tensor, what: str) -> float:
        stats: FeatureStats = extractor.stats(tensor_batches(images), images.shape[0], f"features of {what}")
        return round(fid_from_stats(stats, reference), 3)

    rows = {m: {**scores(outputs[m], truth, low01), "fid": fid(outputs[m], m)} for m in METHODS}
    rows["ground truth"] = {"consistency_mse": float(consistency_error(truth, low01, mode="bicubic").mean()),
                            "fid": fid(truth, "ground truth")}  # fmt: skip
    feature_seconds = time.perf_counter() - t
    load_after = load_averages()

    report = {
        "machine": harness.machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"preset": args.preset, "unet_config": trainer.unet_config.to_dict(),
                  "params_diffusion_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3),
                  "params_regression_M": round(sum(p.numel() for p in regression.model.parameters()) / 1e6, 3)},
        "training": {
            "diffusion": {"steps": diffusion_run.step, "seconds": round(diffusion_run.train_seconds, 1),
                          "final_loss": diffusion_run.loss, "target": config.diffusion.prediction_type},
            "regression": regression_run,
            "batch_size": args.batch_size,
        },
        "sampling_seconds": {m: round(s, 2) for m, s in seconds.items()},
        "sampler": f"{args.sampler}, {args.sample_steps} steps",
        "feature_seconds": round(feature_seconds, 1),
        "test_images": n,
        "fid_reference_images": args.fid_reference or 10000,
        "results": rows,
        "strip": str(strip_path),
    }  # fmt: skip
    harness.write_report(args.results / "sr_fashion.json", report)
    print(table(report))


def table(report: dict[str, Any]) -> str:
    """The results as a markdown table."""
    tr, n = report["training"], report["test_images"]
    lines = [
        f"Fashion-MNIST 7x7 -> 28x28, {n} test images; training {tr['diffusion']['steps']} diffusion steps in "
        f"{tr['diffusion']['seconds']} s, {tr['regression']['steps']} regression steps in "
        f"{tr['regression']['seconds']} s (batch {tr['batch_size']}); load average "
        f"{report['load_average_before']} before, {report['load_average_after']} after",
        "",
        f"| method | PSNR dB | SSIM | consistency MSE | FID vs {report['fid_reference_images']} test "
        f"| seconds for {n} |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["results"].items():
        sec = report["sampling_seconds"].get(name)
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in ("psnr_db", "ssim")]
        cells.append(f"{row['consistency_mse']:.2e}")
        cells.append(f"{row['fid']:.2f}")
        cells.append(f"{sec:.1f}" if sec is not None else "-")
        label = f"diffusion ({report['sampler']})" if name == "diffusion" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
