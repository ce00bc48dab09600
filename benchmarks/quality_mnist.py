"""Quality benchmark (not a test): train on full MNIST for a fixed wall-clock budget, then FID.

Reports the FID of N EMA samples (DDIM, 50 steps) against the 10,000 MNIST test images beside the FID of N
real training images against the same test set (the floor at that sample size; FID is biased upwards for
small N). Inception-v3 features come from diffusekit.evaluation.features (the eval extra); the test-set
statistics are cached, so a second run only pays for its own samples.

    python benchmarks/quality_mnist.py --train-minutes 30 --output-dir runs/quality_mnist

Expect ~30 min of training plus ~45 min of Inception features on 2 CPU cores (first run; ~0.2 s per
image). The result table (markdown) is printed and written to OUTPUT_DIR/result.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
from diffusekit.evaluation.fid import fid_from_stats
from diffusekit.io.images import save_image_grid
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import DataSpec, from_model_range, load_dataset
from diffusekit.training.trainer import Trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-minutes", type=float, default=30.0, help="wall-clock training budget (default 30)")
    p.add_argument("--output-dir", default="runs/quality_mnist")
    p.add_argument("--data", default="mnist", help="mnist (default) or fashion-mnist")
    p.add_argument("--data-root", help="folder holding mnist/ (default: the usual places, see diffusekit train)")
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=2000, help="generated and real images for FID (default 2000)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the samples")
    p.add_argument("--cpu-threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    out = Path(args.output_dir)
    config = TrainConfig().replace(
        data={"source": args.data, "data_root": args.data_root},
        model={"preset": args.preset, "class_conditional": True},
        diffusion={"label_dropout": 0.1, "min_snr_gamma": 5.0},
        optim={"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 200},
        ema={"decay": 0.999},
        run={"output_dir": str(out / "train"), "max_steps": 10**7, "max_minutes": args.train_minutes,
             "checkpoint_every": 1000, "seed": args.seed, "log_every": 20},
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.fit()

    t0 = time.perf_counter()
    n, fake = args.samples, []
    for i in range(0, n, 100):
        k = min(100, n - i)
        fake.append(
            trainer.sample(
                k,
                steps=args.sample_steps,
                seed=args.seed + 1 + i,
                class_labels=trainer.preview_labels(k),
                guidance_scale=args.guidance,
            )
        )
    fake = torch.cat(fake)
    sample_seconds = time.perf_counter() - t0
    save_image_grid(fake[:100], out / "samples.png", nrow=10, scale=2)

    t0 = time.perf_counter()
    extractor = InceptionFeatures()
    test_stats = dataset_stats(args.data, "test", extractor)
    train_ds = load_dataset(DataSpec(source=args.data, data_root=args.data_root))
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(1234))[:n]
    real = from_model_range(train_ds.batch(idx.tolist())[0])
    fid_fake = fid_from_stats(extractor.stats(tensor_batches(fake), n, "features of samples"), test_stats)
    fid_real = fid_from_stats(extractor.stats(tensor_batches(real), n, "features of real images"), test_stats)
    feature_seconds = time.perf_counter() - t0

    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_1min": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
        "preset": args.preset,
        "params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
        "train_minutes": args.train_minutes,
        "steps": result.step,
        "batch": args.batch_size,
        "final_loss": result.loss,
        "samples": n,
        "sampler": f"DDIM {args.sample_steps}, guidance {args.guidance}",
        "fid_generated_vs_test": round(fid_fake, 2),
        "fid_real_train_vs_test": round(fid_real, 2),
        "sample_seconds": round(sample_seconds, 1),
        "feature_seconds": round(feature_seconds, 1),
    }
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    table = (
        "| date | machine | model | training | FID: 2,000 EMA samples vs 10k test "
        "| FID: 2,000 real train vs 10k test |\n"
        "|---|---|---|---|---|---|\n"
        f"| {row['date']} | {row['machine']} (load avg {row['load_average_1min']}) | {args.preset} "
        f"({row['params_M']}M) | {args.train_minutes:g} min = {result.step} steps x {args.batch_size} | "
        f"**{row['fid_generated_vs_test']}** ({row['sampler']}) | {row['fid_real_train_vs_test']} |\n"
    )
    if n != 2000:
        table = table.replace("2,000", f"{n:,}")
    (out / "result.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
