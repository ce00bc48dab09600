"""Experiment (not a test, not library code): does the classic epsilon-prediction sampler fail under guidance
because DDIM mixes the clamped x0_hat with the unclamped eps_hat, and does deriving eps_hat from the clamped x0_hat
(GLIDE's "clipped model output" rule, which ``EDMDenoiser`` uses since 6ab5ac1) fix it?

Loads a model kept by ``quality_curve.py --preconditioning none`` (class-conditional MNIST, eps target, Min-SNR-5),
draws 300 samples (30 per class) with DDIM 50 at guidance 1, 2 and 3 under each rule, and reports the accuracy of
the digit classifier (``diffusekit.evaluation.classifier``) on the class each sample was drawn for. The two rules
differ only in the sampler config's ``clip_eps`` (``samplers.common.Denoiser``): off is the reference's rule
(what loaded reference pipelines keep, for parity), on is what the models trained here sample with.

    python benchmarks/quality_curve.py --data mnist --preconditioning none --budgets 10 \\
        --steps-per-second 2.07 --output-dir runs/classic        # stop it once run.json is written
    python benchmarks/classic_clamped_eps.py runs/classic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_curve as qc  # noqa: E402

from diffusekit.evaluation.classifier import accuracy, classifier_for  # noqa: E402
from diffusekit.io.weights import load_weights  # noqa: E402
from diffusekit.pipelines.unconditional import UnconditionalPipeline  # noqa: E402
from diffusekit.training.export import sampler_config  # noqa: E402

RULES = {"reference (unclamped eps)": False, "clamped eps": True}  # the sampler config's clip_eps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the output folder of the quality_curve.py run")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    run = json.loads((args.run / "run.json").read_text())
    trainer = qc.Trainer(qc.train_config(argparse.Namespace(**run["settings"]), args.run / "exp-scratch", 1, None))
    trainer.ema.load_state_dict(load_weights(args.run / run["kept"][0]["weights"]))
    classifier, _ = classifier_for(run["settings"]["data"])
    n = args.samples // 100
    labels = torch.cat([trainer.preview_labels(100) for _ in range(n)])
    trainer.ema.eval()
    for rule, clip_eps in RULES.items():
        config = dataclasses.replace(sampler_config(trainer.config.diffusion, "ddim"), clip_eps=clip_eps)
        pipe = UnconditionalPipeline(trainer.ema, config)
        for guidance in (1.0, 2.0, 3.0):
            images = torch.cat([
                pipe(100, steps=args.steps, generator=torch.Generator().manual_seed(1 + i),
                     class_labels=labels[i * 100 : (i + 1) * 100], guidance_scale=guidance, show_progress=False)
                for i in range(n)
            ])  # fmt: skip
            row = {"rule": rule, "guidance": guidance, "accuracy": round(accuracy(classifier, images, labels), 4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
