"""Where the SD-1.5 U-Net's time goes on this CPU (not a test): diffusekit's W3 forward (the CFG batch of 2 at
64x64 latents, random weights) under ``torch.profiler``, self time grouped by operator, per dtype, beside a
timing of the attention kernel alone at the shape of the 64x64 self-attention, in each dtype.

    python benchmarks/profile_unet.py --cpu-threads 2 --dtypes float32 bfloat16 --json profile.json

One warm-up call, then one profiled call per dtype; the shares are what to optimise, the absolute times are
those of a profiled call (the profiler adds a little). Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit.bench.harness import machine, stamped_path
from diffusekit.bench.workloads import ours, spec

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# operator -> what it is in the U-Net (the rest is summed as "other")
KINDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::mkldnn_convolution": "convolution (oneDNN)",
    "aten::convolution": "convolution (oneDNN)",
    "aten::addmm": "matmul (linear layers; float32 fast convolutions)",
    "aten::mm": "matmul (linear layers; float32 fast convolutions)",
    "aten::bmm": "matmul (linear layers; float32 fast convolutions)",
}


def breakdown(run: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """(wall seconds of one profiled call, self CPU seconds by kind)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    by: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by[KINDS.get(event.key, "other")] += event.self_cpu_time_total / 1e6
    return wall, dict(by)


def attention_seconds(dtype: torch.dtype, reps: int = 3) -> float:
    """The best of ``reps`` calls of SDPA at the 64x64 self-attention's shape: (2, 8, 4096, 40)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4096, 40, generator=g).to(dtype) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--cpu-threads", type=int)
    p.add_argument("--tiny", action="store_true", help="the tiny stand-in U-Net (a smoke test)")
    p.add_argument("--json", type=Path, default=None,
                   help="the report (default: a new file per run, "
                   "benchmarks/results/profile_unet-<UTC time>.json)")  # fmt: skip
    args = p.parse_args(argv)
    args.json = args.json or stamped_path(ROOT / "benchmarks" / "results", "profile_unet")
    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            p.error(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
        torch.set_num_threads(args.cpu_threads)
    rows = []
    for name in args.dtypes:
        case = ours("W3", spec("W3", tiny=args.tiny), DTYPES[name])
        case.run()  # warm-up (and kernel choice)
        wall, by = breakdown(case.run)
        total = sum(by.values())
        row = {"dtype": name, "wall_s": round(wall, 3), "self_cpu_s": {k: round(v, 3) for k, v in by.items()},
               "share": {k: round(v / total, 3) for k, v in by.items()},
               "sdpa_64x64_self_attention_s": round(attention_seconds(DTYPES[name]), 4)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
