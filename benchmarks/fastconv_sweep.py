"""Per-layer timing of diffusekit's fast 3x3 convolutions (``diffusekit.runtime.fastconv``) against PyTorch's
direct convolution (oneDNN), on the layer shapes of the issue-5 workloads: the evidence behind the size rules
in ``fastconv.choose``.

    python benchmarks/fastconv_sweep.py [--reps 5] [--json benchmarks/results/fastconv_sweep.json]

Each row: float32, channels-last input and weights, inference mode, the two (or three) implementations
interleaved, median of ``--reps`` runs after a warm-up; ``chosen`` is what ``choose`` picks for that shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit.bench import timing
from diffusekit.bench.harness import machine
from diffusekit.runtime import fastconv

# (batch, C_in, C_out, size): the 3x3 stride-1 layers of W1 (DDPM CIFAR-10, batch 16), W3 (SD U-Net,
# batch 2 latents) and W4 (SD VAE decoder, one 512x512 image), plus narrower/wider neighbours.
SHAPES = [
    (16, 128, 128, 32), (16, 256, 256, 16), (16, 256, 128, 32), (16, 256, 256, 8), (16, 512, 256, 16),
    (2, 128, 128, 32), (2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 1280, 16), (2, 1280, 1280, 8),
    (2, 2560, 1280, 8), (1, 512, 512, 64), (1, 512, 512, 128), (1, 256, 256, 256), (1, 128, 128, 512),
]  # fmt: skip


def _layer(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict:
    fns = {"direct": lambda: F.conv2d(x, w, b, padding=1), "winograd": lambda: fastconv.winograd_conv3x3(x, w, b)}
    if x.shape[0] * x.shape[2] * x.shape[3] <= 512:
        fns["im2col"] = lambda: fastconv.gemm_conv3x3(x, w, b)
    return fns


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(f"{'N':>3} {'C_in':>5} {'C_out':>5} {'size':>4} | {'direct ms':>9} {'winograd':>9} {'im2col':>9} | chosen")
    for n, c, co, size in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, size, size, generator=g).to(memory_format=torch.channels_last)
        w = torch.randn(co, c, 3, 3, generator=g).to(memory_format=torch.channels_last) * (c * 9) ** -0.5
        b = torch.randn(co, generator=g)
        with torch.inference_mode():
            times = timing.interleaved(_layer(x, w, b), reps=args.reps)
            ms = {k: 1e3 * timing.median(v) for k, v in times.items()}
            chosen = fastconv.choose(x, w) or "direct"
        row = {"n": n, "c_in": c, "c_out": co, "size": size, "chosen": chosen, **{f"{k}_ms": v for k, v in ms.items()}}
        rows.append(row)
        gemm = f"{ms['im2col']:9.1f}" if "im2col" in ms else f"{'-':>9}"
        line = f"{n:3d} {c:5d} {co:5d} {size:4d} | {ms['direct']:9.1f} {ms['winograd']:9.1f} {gemm} | {chosen}"
        print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "reps": args.reps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
