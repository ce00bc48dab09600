"""Experiment (not a test): what eps re-derived from the clamped x0 (the sampler config's ``clip_eps``, on for the
models trained here) changes for a super-resolution model. Loads the diffusion upscaler that ``sr_fashion.py``
exported, upscales the first N Fashion-MNIST test images (made 4 times smaller as the trainer makes them) with
the same seeds under each rule and prints PSNR, SSIM and the consistency error of each (``sr_fashion.scores``),
with ``--fid`` also the FID against the 10,000 test images (``sr_fashion.py``'s protocol, cached statistics).

    python benchmarks/sr_clip_eps.py runs/sr_fashion/diffusion/model --samples 500
    python benchmarks/sr_clip_eps.py runs/sr_fashion/diffusion/model --samples 2000 --fid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sr_fashion  # noqa: E402

from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches  # noqa: E402
from diffusekit.evaluation.fid import fid_from_stats  # noqa: E402
from diffusekit.pipelines.super_resolution import load_sr_pipeline  # noqa: E402
from diffusekit.training.data import DATASETS_ENV, DataSpec, from_model_range, load_dataset  # noqa: E402
from diffusekit.training.super_resolution import degrade  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the diffusion upscaler's exported model/ folder")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--data-root", help="folder holding fashion-mnist/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid", action="store_true", help="also the FID against the 10,000 test images")
    args = p.parse_args()
    if args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    if args.data_root:
        os.environ[DATASETS_ENV] = args.data_root
    if args.fid:
        extractor = InceptionFeatures()
        reference = dataset_stats("fashion-mnist", "test", extractor)
    pipe = load_sr_pipeline(args.model)
    test = load_dataset(DataSpec(source="fashion-mnist", split="test", data_root=args.data_root, limit=args.samples))
    x0 = test.batch(range(len(test)))[0]
    truth = from_model_range(x0)
    task = sr_fashion.train_config(sr_fashion.parse_args([])).task  # the benchmark's degradation
    low01 = from_model_range(degrade(x0, task))
    base = pipe.sampler_config
    for clip_eps in (False, True):
        pipe.sampler_config = dataclasses.replace(base, clip_eps=clip_eps)
        t = time.perf_counter()
        out = sr_fashion.diffusion_upscale(pipe, low01, args.steps, args.sampler, args.seed)  # its seeds
        row = {"clip_eps": clip_eps, "samples": args.samples, "sampler": f"{args.sampler} {args.steps}",
               **{k: round(v, 6) for k, v in sr_fashion.scores(out, truth, low01).items()},
               "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        if args.fid:
            stats = extractor.stats(tensor_batches(out), out.shape[0], f"features, clip_eps={clip_eps}")
            row["fid"] = round(fid_from_stats(stats, reference), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
