"""Text-conditional latent diffusion on the bundled digits (not a test): are the prompts followed?

Trains a latent U-Net on the bundled MNIST subset with the caption "a handwritten <digit word>" for each class
(``latent.class_captions``; the CLIP text encoder is trained from scratch on a BPE vocabulary of the captions),
through the given KL autoencoder (e.g. the one ``diffusekit demo --latent`` trains:
runs/demo-latent/autoencoder/vae). Then, for each guidance scale, it draws ``--per-prompt`` images for each of
the ten prompts and reports the accuracy of a small classifier trained on the real digits
(``diffusekit.evaluation.classifier``) on the digit the prompt names, with a grid of the first 8 images per
prompt (one prompt per column, zero to nine).

    python benchmarks/text_digits.py --vae runs/demo-latent/autoencoder/vae --output-dir runs/text_digits
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusekit.bench.harness import machine
from diffusekit.bench.timing import load_averages

WORDS = "zero one two three four five six seven eight nine".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="a KL autoencoder folder for 28x28 digits")
    p.add_argument("--output-dir", default="runs/text_digits")
    p.add_argument("--steps", type=int, default=2000, help="U-Net training steps (default 2000)")
    p.add_argument("--preset", default="latent-7x7")
    p.add_argument("--guidances", default="1,3", help="CFG scales to evaluate (default 1,3)")
    p.add_argument("--per-prompt", type=int, default=30, help="images per prompt and guidance (default 30)")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--evaluate-only", action="store_true", help="score the model OUTPUT_DIR/run/model")
    return p.parse_args(argv)


def config_text(args: argparse.Namespace) -> str:
    captions = ", ".join(f'"a handwritten {w}"' for w in WORDS)
    return (
        f'[data]\nsource = "bundled"\n\n[latent]\nvae = "{Path(args.vae).resolve()}"\nconditioning = "text"\n'
        f"class_captions = [{captions}]\n\n[model]\npreset = \"{args.preset}\"\n\n"
        "[diffusion]\nlabel_dropout = 0.1\nmin_snr_gamma = 5.0\n\n"
        "[optim]\nlr = 1e-3\nbatch_size = 64\nwarmup_steps = 200\n\n[ema]\ndecay = 0.999\n\n"
        f"[run]\nmax_steps = {args.steps}\ncheckpoint_every = 500\nlog_every = 50\n"
    )


def evaluate(model: Path, out: Path, guidances: list[float], per_prompt: int) -> list[dict]:
    from diffusekit.evaluation.classifier import accuracy, classifier_for
    from diffusekit.io.images import save_image_grid
    from diffusekit.pipelines.loading import load_pipeline
    from diffusekit.pipelines.text_to_image import TextToImage

    classifier, classifier_accuracy = classifier_for("bundled")
    t2i = TextToImage(load_pipeline(model))
    rows = []
    for g in guidances:
        t0 = time.perf_counter()
        images = []
        for d, word in enumerate(WORDS):
            result = t2i([f"a handwritten {word}"] * per_prompt, height=28, width=28, steps=50, guidance_scale=g,
                         sampler="ddim", generator=torch.Generator().manual_seed(d), show_progress=False)  # fmt: skip
            images.append(result.images.float().clamp(0, 1).mean(1, keepdim=True))
        x = torch.cat(images)
        labels = torch.arange(10).repeat_interleave(per_prompt)
        shown = min(8, per_prompt)
        grid = torch.stack([x[d * per_prompt : d * per_prompt + shown] for d in range(10)], 1).flatten(0, 1)
        save_image_grid(grid, out / f"prompt_grid_g{g:g}.png", nrow=10, scale=3)
        rows.append({"guidance": g, "samples": len(x), "class_accuracy": round(accuracy(classifier, x, labels), 4),
                     "classifier_heldout_accuracy": round(classifier_accuracy, 4),
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "settings": vars(args), "load_before": load_averages()}
    if not args.evaluate_only:
        (out / "config.toml").write_text(config_text(args))
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "diffusekit", "train", "--config", str(out / "config.toml"), "--output-dir",
               str(out / "run"), "--cpu-threads", str(args.cpu_threads), "--no-progress"]  # fmt: skip
        subprocess.run(cmd, check=True)
        report["train_seconds"] = round(time.perf_counter() - t0, 1)
    guidances = [float(g) for g in args.guidances.split(",")]
    report["rows"] = evaluate(out / "run" / "model", out, guidances, args.per_prompt)
    report["load_after"] = load_averages()
    (out / "text_digits.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
