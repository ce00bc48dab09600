"""Soak test: train and generate for a bounded time in one process, sampling resident memory (RSS).

One long training run (checkpoints written every ``--checkpoint-every`` steps) whose per-step callback
generates images every ``--generate-every-s`` seconds: text-to-image with the tiny Stable Diffusion fixture
pipeline (reloaded from disk every ``--reload-every`` generations, so loading is soaked too) and DDIM
samples from the model being trained, each written as a PNG. A thread reads VmRSS from /proc every
``--sample-every-s`` seconds.

The figure of merit is the RSS growth from minute ``--warmup-min`` (5 by default: allocator pools, the
kernels' caches and the first checkpoint are in place by then) to the end; the goal is < 5%.

    python stress/soak.py --minutes 30 --out /tmp/soak --report /tmp/soak/report.json

Exit status 0 when the growth is within ``--max-growth-pct``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SD = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class RssSampler(threading.Thread):
    """Appends (seconds since start, RSS MiB) every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self.t0 = interval, [], time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self.t0, rss_mib()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.samples.append((time.monotonic() - self.t0, rss_mib()))


def summarize(samples: list[tuple[float, float]], warmup_s: float, window_s: float = 300.0) -> dict:
    """RSS at the first sample at/after ``warmup_s``, at the end, the maximum, and the growth between; also
    the growth of the median over the last ``window_s`` against the median over the window starting at
    ``warmup_s`` (robust to the sawtooth of the allocator)."""
    after = [s for s in samples if s[0] >= warmup_s] or samples[-1:]
    start, end = after[0][1], samples[-1][1]
    end_t = samples[-1][0]
    first = [m for t, m in after if t < warmup_s + window_s] or [start]
    last = [m for t, m in after if t >= end_t - window_s] or [end]
    return {
        "samples": len(samples),
        "rss_start_mib": round(samples[0][1], 1),
        "rss_at_warmup_mib": round(start, 1),
        "rss_end_mib": round(end, 1),
        "rss_max_mib": round(max(s[1] for s in samples), 1),
        "rss_max_after_warmup_mib": round(max(s[1] for s in after), 1),
        "growth_after_warmup_pct": round(100 * (end - start) / start, 2),
        "peak_growth_after_warmup_pct": round(100 * (max(s[1] for s in after) - start) / start, 2),
        "median_first_window_mib": round(statistics.median(first), 1),
        "median_last_window_mib": round(statistics.median(last), 1),
        "median_growth_pct": round(
            100 * (statistics.median(last) - statistics.median(first)) / statistics.median(first), 2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="total training time budget")
    p.add_argument("--out", type=Path, required=True, help="work folder (run, images)")
    p.add_argument("--report", type=Path, help="write the figures as JSON here")
    p.add_argument("--warmup-min", type=float, default=5.0, help="growth is measured from this minute")
    p.add_argument("--sample-every-s", type=float, default=5.0)
    p.add_argument("--generate-every-s", type=float, default=15.0)
    p.add_argument("--reload-every", type=int, default=10, help="reload the SD pipeline every N generations")
    p.add_argument("--checkpoint-every", type=int, default=100, help="training steps between checkpoints")
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--max-growth-pct", type=float, default=5.0)
    p.add_argument("--summarize", type=Path, metavar="REPORT", help="only recompute the figures of a saved report")
    args = p.parse_args(argv)
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        figures = summarize([tuple(x) for x in report["rss_trace"]], args.warmup_min * 60)
        print(json.dumps(figures, indent=2))
        return 0

    from diffusekit.utils.images import to_pil

    from diffusekit.pipelines.common import generators_from_seeds
    from diffusekit.pipelines.loading import load_pipeline
    from diffusekit.pipelines.text_to_image import TextToImage
    from diffusekit.training.config import TrainConfig
    from diffusekit.training.trainer import Trainer

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    images_dir = args.out / "images"
    images_dir.mkdir(exist_ok=True)
    config = TrainConfig().replace(
        data={"limit": 1024, "num_workers": 0},
        model={"preset": args.preset},
        optim={"batch_size": args.batch_size, "warmup_steps": 20},
        run={
            "output_dir": str(args.out / "run"),
            "max_steps": 10**9,
            "max_minutes": args.minutes,
            "checkpoint_every": args.checkpoint_every,
            "keep_checkpoints": 2,
            "log_every": 50,
            "progress": False,
            "tensorboard": False,
            "device": "cpu",
            "seed": 0,
        },
    )
    sampler = RssSampler(args.sample_every_s)
    sampler.start()
    counters = {"generations": 0, "sd_loads": 0, "images": 0, "steps": 0}
    sd_box: dict[str, TextToImage] = {}
    last = [time.monotonic()]

    def generate(trainer: Trainer, step: int) -> None:
        counters["steps"] = step
        if time.monotonic() - last[0] < args.generate_every_s:
            return
        last[0] = time.monotonic()
        n = counters["generations"]
        if n % args.reload_every == 0:
            sd_box.clear()  # drop the old pipeline before loading the new one
            sd_box["t2i"] = TextToImage(load_pipeline(FIXTURE_SD))
            counters["sd_loads"] += 1
        out = sd_box["t2i"](["a red cube", "a blue sphere"], height=32, width=32, steps=5,
                            generator=generators_from_seeds(n, 2), show_progress=False)  # fmt: skip
        digits = trainer.sample(4, steps=5, seed=n)
        for i, img in enumerate(to_pil(out.images) + to_pil(digits)):
            img.save(images_dir / f"{n % 5}-{i}.png")  # a bounded set of files, overwritten in turn
            counters["images"] += 1
        counters["generations"] += 1

    t0 = time.monotonic()
    result = Trainer(config, on_step_end=generate).fit()
    sampler.stop()
    figures = summarize(sampler.samples, args.warmup_min * 60)
    figures.update(
        minutes=round((time.monotonic() - t0) / 60, 2),
        train_steps=result.step,
        **counters,
        preset=args.preset,
        torch=torch.__version__,
        python=sys.version.split()[0],
        rss_trace=[(round(t, 1), round(m, 1)) for t, m in sampler.samples],
    )
    text = json.dumps(figures, indent=2)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    summary = {k: v for k, v in figures.items() if k != "rss_trace"}
    print(json.dumps(summary, indent=2))
    growth = max(figures["growth_after_warmup_pct"], figures["median_growth_pct"])
    ok = growth < args.max_growth_pct
    print(f"soak: RSS growth from minute {args.warmup_min:g} to the end = {figures['growth_after_warmup_pct']}% "
          f"(medians of the first and last 5-minute windows: {figures['median_growth_pct']}%; "
          f"{'OK' if ok else 'FAIL'}: goal < {args.max_growth_pct}%)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
