"""Experiment (not a test, not library code): does the classic epsilon-prediction sampler fail under guidance
because DDIM mixes the clamped x0_hat with the unclamped eps_hat, and does deriving eps_hat from the clamped x0_hat
(GLIDE's "clipped model output" rule, which ``EDMDenoiser`` uses since 6ab5ac1) fix it?

Loads a model kept by ``quality_curve.py --preconditioning none`` (class-conditional MNIST, eps target, Min-SNR-5),
draws 300 samples (30 per class) with DDIM 50 at guidance 1, 2 and 3 under each rule, and reports the accuracy of
the digit classifier (``diffusekit.evaluation.classifier``) on the class each sample was drawn for. The clamped
rule is swapped in by replacing ``Denoiser.__call__`` for the run only; the library keeps the reference's rule
(parity).

    python benchmarks/quality_curve.py --data mnist --preconditioning none --budgets 10 \\
        --steps-per-second 2.07 --output-dir runs/classic        # stop it once run.json is written
    python benchmarks/classic_clamped_eps.py runs/classic
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_curve as qc  # noqa: E402

from diffusekit.diffusion.parametrization import Prediction  # noqa: E402
from diffusekit.evaluation.classifier import accuracy, classifier_for  # noqa: E402
from diffusekit.io.weights import load_weights  # noqa: E402
from diffusekit.samplers import common  # noqa: E402

REFERENCE_CALL = common.Denoiser.__call__  # the library's rule: x0_hat clamped, eps_hat as the network gave it


def clamped_eps_call(self, x_t, t, alphas_cumprod, cond=None):
    """The library's ``Denoiser.__call__``, then eps_hat re-derived from its clamped x0_hat:
    eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    pred = REFERENCE_CALL(self, x_t, t, alphas_cumprod, cond)
    if self.clip_sample is None:
        return pred
    return Prediction(pred.x0, (x_t - alphas_cumprod**0.5 * pred.x0) / (1 - alphas_cumprod) ** 0.5)


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
    rules = {"reference (unclamped eps)": REFERENCE_CALL, "clamped eps": clamped_eps_call}
    try:
        for rule, call in rules.items():
            common.Denoiser.__call__ = call
            for guidance in (1.0, 2.0, 3.0):
                images = torch.cat([
                    trainer.sample(100, steps=args.steps, seed=1 + i, class_labels=labels[i * 100 : (i + 1) * 100],
                                   guidance_scale=guidance, sampler="ddim")
                    for i in range(n)
                ])  # fmt: skip
                row = {"rule": rule, "guidance": guidance, "accuracy": round(accuracy(classifier, images, labels), 4)}
                print(json.dumps(row), flush=True)
    finally:
        common.Denoiser.__call__ = REFERENCE_CALL


if __name__ == "__main__":
    main()
