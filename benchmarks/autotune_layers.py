"""Per-layer evidence for kernel choice by measurement: every 3x3 convolution shape of workloads W1, W3 and W4
(benchmarks/README.md) that a fast path can compute, each candidate path timed as runtime.autotune times it
(warm-up, then the median of 3-7 calls), next to the path the size rules of runtime.fastconv pick.

    python benchmarks/autotune_layers.py [--workloads W1 W3 W4] [--budget-seconds 600] [--json PATH]

The shapes are read from the models built on the meta device (no weights, no arithmetic); the timings use
random float32 channels-last tensors. Each row says how often the shape occurs in one forward pass, the
rule's path and the measured fastest, and ``gain`` = time of the rule's path / time of the fastest; the
summary adds them up per workload (3x3 convolutions only). Like compare.py, every row records the load average
(other work above 1.5 makes it 'not evidence', and --json is then refused unless --allow-busy). Time it on an
idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import TITLES, inputs, spec
from diffusekit.errors import ConfigError
from diffusekit.networks.layers import Conv2d
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.runtime import autotune, fastconv

ROOT = Path(__file__).resolve().parents[1]
Shape = tuple[tuple[int, ...], int]  # (N, C_in, H, W), C_out

COLUMNS = [("workload", "workload"), ("layer", "N,C,H,W->C_out"), ("count", "count"), ("gmacs", "GMAC"),
           ("rule", "rule"), ("fastest", "fastest"), ("autotune", "autotune"), ("direct_ms", "direct ms"),
           ("winograd_ms", "winograd ms"), ("gemm_ms", "gemm ms"), ("gain", "gain"), ("load", "load"),
           ("note", "note")]  # fmt: skip


def conv_shapes(workload: str, tiny: bool) -> Counter[Shape]:
    """The 3x3 convolutions of one forward pass of ``workload`` that a fast path can compute, with counts."""
    s = spec(workload, tiny=tiny)
    found: Counter[Shape] = Counter()

    def record(module: Conv2d, args: tuple) -> None:
        x = args[0]
        cpu_x = torch.empty((1, x.shape[1], 1, 1))  # qualifies() reads dtype, device and channels only
        cpu_w = torch.empty((module.out_channels, module.in_channels // module.groups, *module.kernel_size))
        if module.padding_mode == "zeros" and fastconv.qualifies(
            cpu_x, cpu_w, module.stride, module.padding, module.dilation, module.groups
        ):
            found[(tuple(x.shape), module.out_channels)] += 1

    with torch.device("meta"):
        model = UNet(s.unet) if workload in ("W1", "W3") else AutoencoderKL(s.vae)
        inp = {k: v.to("meta") for k, v in inputs(workload, s, torch.float32).items()}
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Conv2d)]
    with torch.inference_mode():
        if workload == "W4":
            model.decode(inp["z"])
        else:
            model(inp["x"], inp["t"], **({"context": inp["context"]} if "context" in inp else {}))
    for h in hooks:
        h.remove()
    return found


def measure_layer(workload: str, shape: Shape, count: int, tuner: autotune.Tuner) -> dict[str, Any]:
    (n, c, h, w), co = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=torch.channels_last)
    weight = (torch.randn(co, c, 3, 3, generator=g) / (3 * c**0.5)).to(memory_format=torch.channels_last)
    rule = fastconv.size_rule(x, weight) or autotune.DIRECT
    with torch.inference_mode():
        pick, ms = tuner.measure(fastconv.candidates(x, weight))
    worth = autotune.worth_measuring(x, weight)
    row: dict[str, Any] = {"workload": workload, "dtype": "float32", "layer": f"{n},{c},{h},{w}->{co}",
                           "count": count, "gmacs": n * h * w * c * co * 9 / 1e9, "rule": rule,
                           "fastest": pick, "autotune": pick if worth else rule}  # fmt: skip
    row.update({f"{k}_ms": v for k, v in ms.items()})
    # a rule's path dropped early (over GIVE_UP_FACTOR x the best) has a single timing: still a fair ratio
    row["gain"] = ms[rule] / ms[row["autotune"]] if rule in ms else None
    row["note"] = None if worth else "below MIN_MACS: autotune keeps the rule"
    return row


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload and "autotune" in r and f"{r['rule']}_ms" in r]
        rule = sum(r["count"] * r[f"{r['rule']}_ms"] for r in mine)
        tuned = sum(r["count"] * r[f"{r['autotune']}_ms"] for r in mine)
        changed = sum(r["rule"] != r["autotune"] for r in mine)
        lines.append(f"{workload}: 3x3 convolutions of one forward {rule:.1f} ms by the size rules, {tuned:.1f} ms "
                     f"as autotune picks ({rule / max(tuned, 1e-9):.2f}x); the choice differs on {changed} of "
                     f"{len(mine)} shapes")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["W1", "W3", "W4"], choices=["W1", "W3", "W4"])
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke test of the script)")
    p.add_argument("--budget-seconds", type=float, default=600.0,
                   help="stop measuring new shapes after this long (default 600)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and the machine as JSON here")
    busy = f"write --json even with rows measured while other work kept the load above {timing.BUSY_LOAD}"
    p.add_argument("--allow-busy", action="store_true", help=busy)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    settings = harness.Settings(workloads=args.workloads, dtypes=["float32"], log=log)
    tuner = autotune.Tuner(mode="measure", path=None, budget_s=float("inf"))
    spent, rows = 0.0, []
    for workload in args.workloads:
        shapes = conv_shapes(workload, args.tiny)
        log(f"[{workload}] {TITLES[workload]}: {len(shapes)} 3x3 shapes a fast path can take")
        for shape, count in sorted(shapes.items(), key=lambda kv: -kv[1]):
            if spent > args.budget_seconds:
                (n, c, h, w), co = shape
                rows.append({"workload": workload, "dtype": "float32", "layer": f"{n},{c},{h},{w}->{co}",
                             "count": count, "note": "not measured: --budget-seconds spent"})  # fmt: skip
                continue
            start = time.monotonic()
            rows.append(harness.under_load(settings, lambda: measure_layer(workload, shape, count, tuner)))  # noqa: B023
            spent += time.monotonic() - start
            log("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    print(timing.format_table(rows, COLUMNS))
    print("\n" + "\n".join(summary(rows)))
    if args.json:
        report = {"machine": harness.machine(), "tiny": args.tiny, "rows": rows, "summary": summary(rows)}
        try:
            harness.write_report(args.json, report, allow_busy=args.allow_busy)
        except ConfigError as e:
            print(f"autotune_layers.py: error: {e}", file=sys.stderr)
            return 2
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
