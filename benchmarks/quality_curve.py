"""Quality per CPU-minute (not a test): FID against training budget and against sampling cost.

Trains one class-conditional model on MNIST or Fashion-MNIST (``--preconditioning edm``: Karras et al. 2022's
preconditioning, log-normal noise levels and loss weight; ``none``: the classic epsilon target with Min-SNR-5)
and keeps the EMA weights at each budget of ``--budgets`` (minutes). Then, for each kept model and each sampler
setting of ``--samplers``, it draws ``--samples`` images (saved as uint8 npz beside the result, so features can
be recomputed without resampling) and reports FID against the 10,000 test images, beside the FID of as many
real training images (the floor at that sample size), and the accuracy of a small classifier trained on the real
data (``diffusekit.evaluation.classifier``) on the samples' classes: does the image drawn for "7" show a 7?

Budgets are wall-clock minutes of training on this machine. On a machine shared with other work, give
``--steps-per-second`` (the rate of the same training measured alone, e.g. with ``--probe``): each budget then
becomes that many optimizer steps (minutes x 60 x rate), so the result does not depend on the load while it
runs; the report says which one was used.

    python benchmarks/quality_curve.py --probe 60 --preconditioning edm          # idle rate, 60 s
    python benchmarks/quality_curve.py --budgets 10,30 --steps-per-second 2.3 --output-dir runs/curve_edm
    python benchmarks/quality_curve.py --evaluate runs/curve_edm --samplers heun:10,dpmpp_2m:20 --samples 1000

``--samplers`` entries are NAME:STEPS (``heun:18`` is 35 network evaluations, the others one per step), or
``heun:STEPS:S_CHURN`` for Heun's stochastic sampler (Karras et al. 2022, Alg. 2).

With ``--ema-kind power`` the run tracks EDM2's power-function EMA (Karras et al. 2024, sec. 3.1) at
``--sigma-rels`` and snapshots it at every budget; ``--evaluate ... --posthoc-sigma-rels 0.02,0.05,0.1`` then
scores the average of each of those lengths, reconstructed after training (their appendix C.2).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusekit.bench.harness import machine
from diffusekit.bench.timing import load_averages
from diffusekit.io.weights import load_weights, save_weights
from diffusekit.training.config import LR_SCHEDULES, TrainConfig
from diffusekit.training.power_ema import SNAPSHOT_DIR, list_snapshots, reconstruct
from diffusekit.training.trainer import Trainer

#: Heun's churn (Karras et al. 2022, Alg. 2) acts on sigma in [0.01, 1] with S_noise 1.007, their CIFAR-10
#: settings (Table 5; S_churn 30 there); ``--samplers heun:18:S`` sets S_churn = S.
CHURN_RANGE = {"s_tmin": 0.01, "s_tmax": 1.0, "s_noise": 1.007}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", choices=("mnist", "fashion-mnist"))
    p.add_argument("--preconditioning", default="edm", choices=("edm", "none"))
    p.add_argument("--preset", default="mnist-small")
    p.add_argument("--model-overrides", default="{}",
                   help='UNetConfig fields as JSON, e.g. \'{"channels": [48, 96, 96]}\'')
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16"), help="run.mixed_precision")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES, help="decay to 0 at the last budget")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ema-kind", default="classic", choices=("classic", "power"))
    p.add_argument("--sigma-rels", default="0.05,0.10", help="power EMA: the tracked lengths (EDM2's sigma_rel)")
    p.add_argument("--snapshot-every", type=int, default=250, help="power EMA: optimizer steps between snapshots")
    p.add_argument("--posthoc-sigma-rels", help="with --evaluate of a power-EMA run: score these reconstructed "
                   "lengths instead of the kept weights, e.g. 0.02,0.05,0.1")  # fmt: skip
    p.add_argument("--budgets", default="10,30", help="training budgets in minutes, comma-separated")
    p.add_argument("--steps-per-second", type=float, help="turn each budget into steps at this (idle) rate")
    p.add_argument("--probe", type=float, metavar="SECONDS", help="only measure the training rate for SECONDS")
    p.add_argument("--samplers", default=None, help="NAME:STEPS[:S_CHURN],... (default heun:18 for edm, ddim:50 "
                   "otherwise; S_CHURN: Heun's stochastic variant)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 2 for edm, 1 otherwise)")
    p.add_argument("--guidance-interval", metavar="LO,HI", help="guide only at noise levels LO < sigma <= HI "
                   "(Kynkaanniemi et al. 2024); default: every level")
    p.add_argument("--guide-step", type=int, metavar="N", help="autoguidance (Karras et al. 2024): guide with the "
                   "power-EMA reconstruction of the same run at optimizer step N (a power-EMA run); --guidance is "
                   "its weight")
    p.add_argument("--guide-sigma-rel", type=float, default=0.05, help="the guide's EMA length (default 0.05)")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--evaluate", metavar="OUTPUT_DIR", help="only sample and score the models a run kept")
    p.add_argument("--train-only", action="store_true", help="train and keep the models; score them later with "
                   "--evaluate")
    p.add_argument("--only-budgets", help="with --evaluate: score only the models of these budgets (minutes)")
    p.add_argument("--output-dir", default="runs/quality_curve")
    p.add_argument("--cpu-threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_config(args: argparse.Namespace, out: Path, max_steps: int, max_minutes: float | None) -> TrainConfig:
    if args.preconditioning == "edm":
        diffusion = {"label_dropout": 0.1, "preconditioning": "edm"}
    else:
        diffusion = {"label_dropout": 0.1, "min_snr_gamma": 5.0}
    return TrainConfig().replace(
        data={"source": args.data},
        model={"preset": args.preset, "class_conditional": True,
               "overrides": json.loads(getattr(args, "model_overrides", "{}"))},
        diffusion=diffusion,
        optim={"lr": args.lr, "batch_size": args.batch_size, "warmup_steps": 200,
               "lr_schedule": getattr(args, "lr_schedule", "constant")},
        ema=ema_config(args),
        run={"output_dir": str(out / "train"), "max_steps": max_steps, "max_minutes": max_minutes, "seed": args.seed,
             "mixed_precision": getattr(args, "mixed_precision", "auto"), "checkpoint_every": 1000, "log_every": 50,
             "tensorboard": False},
    )  # fmt: skip


def ema_config(args: argparse.Namespace) -> dict:
    """The ema section of the run (settings of runs made before the power EMA option read as classic)."""
    if getattr(args, "ema_kind", "classic") != "power":
        return {"decay": args.ema_decay}
    sigma_rels = tuple(float(s) for s in args.sigma_rels.split(","))
    return {"kind": "power", "sigma_rels": sigma_rels, "snapshot_every": args.snapshot_every}


def probe(args: argparse.Namespace) -> None:
    """The training rate of this configuration over ``--probe`` seconds, after 20 warm-up steps."""
    warm: dict[str, float] = {}
    trainer = Trainer(train_config(args, Path(args.output_dir) / "probe", 10**7, args.probe / 60 + 1))

    def mark(trainer: Trainer, step: int) -> None:
        if step == 20:
            warm["t"] = time.perf_counter()
        elif "t" in warm and time.perf_counter() - warm["t"] >= args.probe:
            warm["rate"] = (step - 20) / (time.perf_counter() - warm["t"])
            raise KeyboardInterrupt  # ends the probe; nothing of it is kept

    trainer.on_step_end = mark
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    print(json.dumps({"steps_per_second": round(warm["rate"], 4), "machine": machine(), "load": load_averages()}))


def train(args: argparse.Namespace, out: Path) -> None:
    budgets = sorted(float(b) for b in args.budgets.split(","))
    by_steps = args.steps_per_second is not None
    marks = [round(b * 60 * args.steps_per_second) for b in budgets] if by_steps else []
    config = train_config(args, out, marks[-1] if by_steps else 10**7, None if by_steps else budgets[-1])
    trainer = Trainer(config)
    kept: list[dict] = []
    t_start = time.perf_counter()

    def save(step: int, seconds: float) -> None:
        budget = budgets[len(kept)]
        path = out / f"ema-{budget:g}min.safetensors"
        save_weights({k: v.float() for k, v in trainer.ema.state_dict().items()}, path)
        if trainer.power_ema is not None:  # the post-hoc reconstruction of this budget needs its own step
            trainer.power_ema.save_snapshot(out / "train" / SNAPSHOT_DIR, step, config=trainer.checkpoint_config())
        kept.append({"budget_minutes": budget, "step": step, "train_seconds": round(seconds, 1),
                     "load_average": load_averages(), "weights": path.name})  # fmt: skip
        print(f"kept {path.name} at step {step} ({seconds / 60:.1f} min)", file=sys.stderr, flush=True)

    def keep(trainer: Trainer, step: int) -> None:
        elapsed, i = time.perf_counter() - t_start, len(kept)
        if i < len(budgets) and (step == marks[i] if by_steps else elapsed >= budgets[i] * 60):
            save(step, elapsed)

    trainer.on_step_end = keep
    result = trainer.fit()
    if len(kept) < len(budgets):  # a wall-clock run stops at its last budget before the step that would pass it
        save(trainer.step, result.train_seconds)
    run = {"machine": machine(), "settings": vars(args), "final_loss": result.loss, "kept": kept,
           "budget_kind": "steps at the measured rate" if by_steps else "wall clock",
           "params_M": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 3)}  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")


def evaluate(args: argparse.Namespace, out: Path) -> None:
    from diffusekit.evaluation.classifier import accuracy, classifier_for
    from diffusekit.evaluation.features import InceptionFeatures, dataset_stats, tensor_batches
    from diffusekit.evaluation.fid import fid_from_stats
    from diffusekit.io.images import save_image_grid

    run = json.loads((out / "run.json").read_text())
    settings = argparse.Namespace(**run["settings"])
    edm = settings.preconditioning == "edm"
    samplers = args.samplers or ("heun:18" if edm else "ddim:50")
    guidance = args.guidance if args.guidance is not None else (2.0 if edm else 1.0)
    interval = tuple(float(v) for v in args.guidance_interval.split(",")) if args.guidance_interval else None
    interval_tag = f"-gi{interval[0]:g}-{interval[1]:g}" if interval else ""
    trainer = Trainer(train_config(settings, out / "eval-scratch", 1, None))
    guide, guide_tag = None, ""
    if args.guide_step:
        guide = copy.deepcopy(trainer.ema)
        state, error = reconstruct(list_snapshots(out / "train" / SNAPSHOT_DIR), args.guide_sigma_rel, args.guide_step)
        guide.load_state_dict(state)
        guide_tag = f"-ag{args.guide_step}s{args.guide_sigma_rel:g}"
        print(f"guide: EMA sigma_rel {args.guide_sigma_rel:g} at step {args.guide_step} (profile error {error:.4f})")
    extractor = InceptionFeatures()
    t0 = time.perf_counter()
    test = dataset_stats(settings.data, "test", extractor)
    floor = fid_from_stats(dataset_stats(settings.data, "train", extractor, limit=args.samples), test)
    stats_seconds = time.perf_counter() - t0
    classifier, classifier_test_accuracy = classifier_for(settings.data)
    chunks = [(i, min(100, args.samples - i)) for i in range(0, args.samples, 100)]  # sampled 100 at a time
    labels = torch.cat([trainer.preview_labels(n) for _, n in chunks])  # 0..9 repeating within each chunk
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    kept = run["kept"]
    if args.only_budgets:
        kept = [k for k in kept if k["budget_minutes"] in {float(b) for b in args.only_budgets.split(",")}]
    lengths: list[float | None] = [None]  # None: the weights kept at the budget
    if args.posthoc_sigma_rels:
        lengths = [float(s) for s in args.posthoc_sigma_rels.split(",")]
    models = [(k, length) for k in sorted(kept, key=lambda k: -k["budget_minutes"]) for length in lengths]
    for k, length in models:  # the longest budget first
        ema_tag, profile_error = "", None
        if length is None:
            trainer.ema.load_state_dict(load_weights(out / k["weights"]))
        else:
            state, profile_error = reconstruct(list_snapshots(out / "train" / SNAPSHOT_DIR), length, k["step"])
            trainer.ema.load_state_dict(state)
            ema_tag = f"-ema{length:g}"
        for spec in samplers.split(","):
            name, steps, *rest = spec.split(":")
            churn = float(rest[0]) if rest else 0.0
            nfe = 2 * int(steps) - 1 if name == "heun" else int(steps)
            churn_tag = f"-churn{churn:g}" if churn else ""
            tag = (f"{k['budget_minutes']:g}min{ema_tag}-{name}{steps}{churn_tag}-g{guidance:g}{interval_tag}"
                   f"{guide_tag}-n{args.samples}")
            options = {"s_churn": churn, **CHURN_RANGE} if churn else None
            t0 = time.perf_counter()
            fake = torch.cat([
                trainer.sample(n, steps=int(steps), seed=args.seed + 1 + i, class_labels=labels[i : i + n],
                               guidance_scale=guidance, guidance_interval=interval, guide=guide, sampler=name,
                               sampler_options=options)
                for i, n in chunks
            ])  # fmt: skip
            sample_seconds = time.perf_counter() - t0
            u8 = (fake.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            np.savez_compressed(out / f"samples-{tag}.npz", images=u8)
            save_image_grid(fake[:100], out / f"grid-{tag}.png", nrow=10, scale=2)
            class_accuracy = accuracy(classifier, fake, labels)
            t0 = time.perf_counter()
            fid = fid_from_stats(extractor.stats(tensor_batches(fake), len(fake), "features of samples"), test)
            row = {**k, "sampler": name, "sampler_steps": int(steps), "nfe": nfe, "guidance": guidance,
                   "guidance_interval": interval, "guide_step": args.guide_step,
                   "guide_sigma_rel": args.guide_sigma_rel if args.guide_step else None,
                   "samples": args.samples, "fid": round(fid, 2), "fid_floor_real_train": round(floor, 2),
                   "class_accuracy": round(class_accuracy, 4), "classifier_test_accuracy": classifier_test_accuracy,
                   "sample_seconds": round(sample_seconds, 1), "feature_seconds": round(time.perf_counter() - t0, 1),
                   "stats_seconds": round(stats_seconds, 1), "eval_machine": machine(), "tag": tag,
                   "posthoc_sigma_rel": length, "s_churn": churn,
                   "posthoc_profile_error": None if profile_error is None else round(profile_error, 4)}  # fmt: skip
            results = [r for r in results if r.get("tag") != tag] + [row]
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{tag}: FID {fid:.2f} (floor {floor:.2f}), class accuracy {class_accuracy:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.probe:
        return probe(args)
    if args.evaluate:
        return evaluate(args, Path(args.evaluate))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train(args, out)
    if not args.train_only:
        evaluate(args, out)


if __name__ == "__main__":
    main()
