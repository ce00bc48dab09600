"""Seconds per 512x512 image on this machine: 20 steps DPM-Solver++(2M) with guidance 7.5 against 4 steps of the
LCM sampler with guidance 1 (no unconditional half), on diffusekit's own SD-1.5-size pipeline with random weights
(``workloads.save_random_pipeline``; random weights time the same as trained ones). float32, one image, same
process, interleaved rounds; the first round of each is the warm-up and is not counted.

    python benchmarks/lcm_vs_dpm.py [--rounds 2] [--json benchmarks/results/lcm_vs_dpm.json]

About 3.5 GB of disk for the model folder and, on 2 CPU cores, 10-15 minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusekit.bench import harness
from diffusekit.bench.workloads import save_random_pipeline, spec
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PIPELINE = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"
SETTINGS = {"dpmpp_2m": {"steps": 20, "guidance_scale": 7.5}, "lcm": {"steps": 4, "guidance_scale": 1.0}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where the model folder goes (default: a temp dir)")
    p.add_argument("--tokenizer", type=Path, default=FIXTURE_PIPELINE / "tokenizer")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per sampler after one warm-up round")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke test)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    s = spec("W5", tiny=args.tiny)
    size = 64 if args.tiny else 512
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = save_random_pipeline(Path(tmp) / "w5", s, args.tokenizer)
        pipe = TextToImage(load_pipeline(folder, dtype=torch.float32))
        for r in range(args.rounds + 1):
            for name, kw in SETTINGS.items():
                t = time.perf_counter()
                pipe("a lighthouse at dusk", height=size, width=size, sampler=name, show_progress=False,
                     generator=generators_from_seeds(0, 1), **kw)  # fmt: skip
                if r > 0:
                    times[name].append(time.perf_counter() - t)
    report = {
        "machine": harness.machine(),
        "tiny": args.tiny,
        "size": size,
        "settings": SETTINGS,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
    }
    report["speedup_lcm"] = report["median_seconds"]["dpmpp_2m"] / report["median_seconds"]["lcm"]
    print(json.dumps(report, indent=1))
    if args.json:
        harness.write_report(args.json, report)


if __name__ == "__main__":
    main()
