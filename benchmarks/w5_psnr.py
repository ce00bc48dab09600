"""W5 at full size on diffusekit alone: the PSNR of its bfloat16 image against its float32 image (the target is
>= 30 dB), with the time of each. No reference needed: the model is diffusekit's own SD-1.5-size pipeline
with random weights (``workloads.save_random_pipeline``), 512x512, 20 steps DPM-Solver++(2M), guidance 7.5.

    python benchmarks/w5_psnr.py [--workdir DIR] [--json benchmarks/results/w5_psnr.json]

About 3.5 GB of disk for the model folder and, on 2 CPU cores, 10-15 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import ours, save_random_pipeline, spec

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PIPELINE = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where the model folder goes (default: a temp dir)")
    p.add_argument("--tokenizer", type=Path, default=FIXTURE_PIPELINE / "tokenizer")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke test)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    s = spec("W5", tiny=args.tiny)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = save_random_pipeline(Path(tmp) / "w5", s, args.tokenizer)
        images, seconds = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            case = ours("W5", s, dtype, folder=folder)
            t = time.perf_counter()
            images[str(dtype)] = case.run()
            seconds[str(dtype).removeprefix("torch.")] = time.perf_counter() - t
            del case
    value = timing.psnr(images["torch.bfloat16"], images["torch.float32"])
    report = {"machine": harness.machine(), "tiny": args.tiny, "seconds": seconds, "psnr_bf16_vs_fp32_db": value}
    print(json.dumps(report, indent=1))
    if args.json:
        harness.write_report(args.json, report)


if __name__ == "__main__":
    main()
