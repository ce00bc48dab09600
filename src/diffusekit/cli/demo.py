"""``diffusekit demo``: the main job. Train a small U-Net on the bundled MNIST subset, sample a DDIM grid,
and report FID against the held-out split; with ``--latent`` the latent-diffusion chain instead
(``diffusekit.cli.demo_latent``). What both share lives in ``diffusekit.cli.demo_common``."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from diffusekit.cli.demo_common import (
    GRID_FILE,
    GUIDE_DIR,
    REPORT_FILE,
    RUN_ENTRIES,
    check_output_dir,
    check_shared_options,
    clear_runs,
    fid_available,
    grid_of_samples,
    heldout_fid,
    print_report,
    unet_sections,
    write_report,
)
from diffusekit.cli.train_common import add_former_spellings, set_cpu_threads, show_option_rules
from diffusekit.cli.train_common import check_options as check_option_rules
from diffusekit.errors import ConfigError
from diffusekit.limits import check_float
from diffusekit.pipelines.unconditional import GUIDE_LABELS
from diffusekit.training.config import LR_SCHEDULES

DESCRIPTION = """\
The main job, end to end on a CPU: trains a class-conditional U-Net (the mnist-small preset, ~1M
parameters) with the EDM preconditioning (Karras et al. 2022: noise levels drawn log-normally, the network's
input, output and loss scaled per noise level) on the 20,000-image MNIST subset bundled with diffusekit for
1,200 optimizer steps, then samples a 10x10 grid with Heun's 2nd-order sampler on the Karras noise grid (18
steps, 35 network evaluations) and autoguidance 2 (Karras et al. 2024: guided away from the EMA of step 400,
kept as a weaker version of the model and given the "no class" label; --guide-at 0 for classifier-free
guidance), one digit class per column, and, when the eval extra is installed (pip install 'diffusekit[eval]'),
computes the FID of generated digits against the held-out split next to the FID of as many real training
digits (the floor for that sample size).
--preconditioning none trains the classic epsilon target with Min-SNR weighting instead (sampled with DDIM,
no guidance: at 800 steps its digits are speckled and a third of them malformed; guidance makes them worse).

Defaults fit about 15 minutes on 2 otherwise idle CPU cores. Measured on an idle 2-core AMD EPYC (Zen 4,
native bf16): 10 min 56 s in all - 538 s of training (1,200 steps of 64 images, 0.45 s each in bf16
autocast; 0.51 s in float32 on the same CPU, the path of CPUs without native bf16: ~13-16 minutes there),
then the grid, 250 FID samples and their
Inception features (the real-image statistics are cached; the first run adds ~1,250 images at ~0.2 s each). The
budget is in steps so that a slower or busy machine takes longer but still gets digits; --max-minutes caps the
wall clock instead (fewer steps: blurrier digits).
Everything lands in --output-dir: the training run (checkpoints/, model/, guide/, metrics.jsonl,
loss_curve.png), samples.png and report.json."""

EPILOG = """\
examples:
  diffusekit demo                                   # the README's main job
  diffusekit demo --steps 3000 --output-dir runs/demo3k   # better digits, 2.5x the training time
  diffusekit demo --no-fid --max-minutes 2                # a quick look"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from diffusekit.cli import demo_latent

    p = subparsers.add_parser(
        "demo",
        help="train on the bundled digits, sample a grid, report FID (--latent: the latent-diffusion chain)",
        description=DESCRIPTION + "\n\n" + demo_latent.DESCRIPTION,
        epilog=EPILOG + "\n" + demo_latent.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    latent = demo_latent.DEFAULTS
    p.add_argument("--latent", action="store_true",
                   help="the latent-diffusion chain: train-vae, then train --latent, then grid and FID")  # fmt: skip
    p.add_argument("--steps", type=int, metavar="N",
                   help=f"U-Net training steps (default {PIXEL_DEFAULTS['steps']}; with --latent "
                        f"{latent['steps']})")  # fmt: skip
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop the U-Net's training after M minutes (default: none)")  # fmt: skip
    p.add_argument(
        "--output-dir", metavar="DIR",
        help=f"default {PIXEL_DEFAULTS['output_dir']} (with --latent {latent['output_dir']}); its train/ folder "
        "(with --latent also autoencoder/) is replaced by the new run, refused when it holds files a training "
        "run does not write, and so are samples.png and report.json when a former demo did not write them",
    )  # fmt: skip
    p.add_argument("--preset", metavar="NAME",
                   help=f"U-Net preset (default {PIXEL_DEFAULTS['preset']}; with --latent {latent['preset']}; "
                        "'diffusekit train --help' lists them)")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N",
                   help="train on the first N of the 20,000 bundled digits (default: all of them)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="training batch (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="AdamW learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="learning rate after the 200 warmup steps: constant (default), or cosine / linear decay "
                        "to 0 at --steps (a run stopped earlier by --max-minutes ends above 0)")  # fmt: skip
    p.add_argument("--preconditioning", choices=("edm", "none"), metavar="{edm,none}",
                   help="edm (the pixel demo's default): Karras et al. 2022's preconditioning, log-normal noise "
                        "levels and loss weighting, sampled with Heun on their noise grid; none (the latent demo's): "
                        "the classic epsilon/x0/v target with Min-SNR weighting, sampled with DDIM")  # fmt: skip
    p.add_argument("--prediction-type", choices=("epsilon", "sample", "v_prediction"),
                   help="network target with --preconditioning none (default epsilon)")  # fmt: skip
    p.add_argument("--min-snr-gamma", type=float, metavar="G",
                   help="Min-SNR-gamma weighting with --preconditioning none (default 5)")  # fmt: skip
    p.add_argument("--sampler", choices=DEMO_SAMPLERS,
                   help="sampler of the grid and the FID samples (default heun with edm, ddim otherwise)")
    p.add_argument("--guidance", type=float, metavar="S",
                   help=f"guidance weight for the grid: autoguidance (see --guide-at), or classifier-free guidance "
                        f"with --guide-at 0 (default {EDM_GUIDANCE} with edm; "
                        "1, no guidance, otherwise: at this short training the classic model's digits distort "
                        "under guidance)")  # fmt: skip
    p.add_argument("--guide-at", type=float, metavar="F",
                   help="autoguidance (Karras et al. 2024): keep the EMA of step F x --steps as a weaker version of "
                        "the model and guide the samples away from it with weight --guidance, instead of "
                        "classifier-free guidance (default 1/3; 0: classifier-free guidance). The guide is "
                        "exported to OUTPUT_DIR/train/guide for `diffusekit sample --guide-model`")
    p.add_argument("--guide-labels", choices=GUIDE_LABELS,
                   help="what the autoguidance guide sees: none, the \"no class\" label (default: a guide both "
                        "earlier and unconditional; at this short training it keeps more digits in their column), or "
                        "class, each digit's class (as Karras et al. 2024 do)")  # fmt: skip
    p.add_argument("--sample-steps", type=int, metavar="N",
                   help=f"sampler steps (default {HEUN_STEPS} for heun, i.e. {2 * HEUN_STEPS - 1} network "
                        "evaluations; 50 for the others)")  # fmt: skip
    p.add_argument("--grid-rows", type=int, default=10, metavar="N", help="grid rows of 10 digits (default 10)")
    p.add_argument(
        "--fid-samples", type=int, default=250, metavar="N", help="generated (and real) images for FID (default 250)"
    )
    p.add_argument(
        "--fid-heldout",
        type=int,
        default=1000,
        metavar="N",
        help="held-out images for the reference statistics (default 1000 of the 2000)",
    )
    p.add_argument("--fid-guidance", type=float, metavar="S",
                   help="CFG scale of FID samples (default: as --guidance)")  # fmt: skip
    p.add_argument("--no-fid", action="store_true", help="skip FID")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="training and sampling seed (default 0)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; on a machine busy with other work, 1 is often faster)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo_latent.add_options(p)
    show_option_rules(p)  # the same rules as the training commands
    add_former_spellings(p, FORMER_SPELLINGS)
    p.set_defaults(run=run)
    return p


# spellings of earlier versions that still parse (hidden from --help) -> the option's name now, as in train
FORMER_SPELLINGS = {"--train-minutes": "--max-minutes", "--vae-train-minutes": "--vae-max-minutes"}
PIXEL_DEFAULTS = {"steps": 1200, "preset": "mnist-small", "output_dir": "runs/demo", "preconditioning": "edm"}
DEMO_SAMPLERS = ("heun", "ddim", "dpmpp_2m", "euler", "ddpm")
EDM_GUIDANCE = 2.0
GUIDE_AT = 1 / 3  # the guide's step as a fraction of --steps (step 400 of 1,200)
DEMO_GUIDE_LABELS = "none"  # the guide sees the "no class" label (measured: benchmarks/README.md, the main job)
HEUN_STEPS = 18
CLASSIC = {"prediction_type": "epsilon", "min_snr_gamma": 5.0}


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The options whose defaults differ between the pixel and the latent demo, filled in for the one run;
    an option of the latent demo given without --latent is an error naming it."""
    from diffusekit.cli import demo_latent

    if not args.latent:
        given = [o for o in demo_latent.LATENT_ONLY if getattr(args, o) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to the latent demo only (add --latent)")
    defaults = demo_latent.DEFAULTS if args.latent else PIXEL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    edm = args.preconditioning == "edm"
    if args.latent and edm:
        raise ConfigError("--preconditioning edm applies to the pixel demo only (latent training supports the "
                          "classic target: --preconditioning none, the latent demo's default)")  # fmt: skip
    for name, value in CLASSIC.items():  # the classic target's settings; EDM fixes its own
        if edm and getattr(args, name) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} applies to --preconditioning none only "
                              "(EDM fixes the network's target and the loss weighting)")  # fmt: skip
        if not edm and getattr(args, name) is None:
            setattr(args, name, value)
    if args.sampler is None:
        args.sampler = "heun" if edm else "ddim"
    if args.latent and args.sampler != "ddim":
        raise ConfigError("--sampler applies to the pixel demo only (the latent demo samples with ddim)")
    if args.sample_steps is None:
        args.sample_steps = HEUN_STEPS if args.sampler == "heun" else 50
    if args.latent and args.guide_at is not None:
        raise ConfigError("--guide-at applies to the pixel demo only (the latent demo uses classifier-free guidance)")
    if args.guide_at is None and not args.latent:
        args.guide_at = GUIDE_AT
    if args.guide_labels is not None and (args.latent or not args.guide_at):
        raise ConfigError("--guide-labels applies to autoguidance in the pixel demo (not with --latent, and "
                          "--guide-at 0 is classifier-free guidance)")  # fmt: skip
    if args.guide_labels is None and not args.latent:
        args.guide_labels = DEMO_GUIDE_LABELS
    if args.guidance is None:
        args.guidance = EDM_GUIDANCE if edm else 1.0
    if args.fid_guidance is None:
        args.fid_guidance = args.guidance
    return args


def check_options(args: argparse.Namespace) -> None:
    """Every option (the defaults of the demo asked for filled in), checked before anything is written or
    trained; errors name the option."""
    from diffusekit.cli import demo_latent

    check_option_rules(args)  # the value itself first, then how it combines with the others
    resolve_defaults(args)
    check_shared_options(args)
    if not args.latent:
        check_float("--guide-at", args.guide_at, 0.0, 0.95)  # the guide must be an earlier, weaker model
    if args.latent:
        demo_latent.check_latent_options(args)


def demo_config(args: argparse.Namespace):
    """The training config of the demo."""
    from diffusekit.training.config import TrainConfig

    return TrainConfig().replace(**unet_sections(args, Path(args.output_dir) / "train"))


RUNS = {"train": RUN_ENTRIES}


def run(args: argparse.Namespace) -> int:
    check_options(args)
    if args.latent:
        from diffusekit.cli import demo_latent

        return demo_latent.run(args)
    from diffusekit.training.export import export_inference
    from diffusekit.training.trainer import Trainer

    out = check_output_dir(args.output_dir, RUNS, (GRID_FILE, REPORT_FILE))
    set_cpu_threads(args)
    clear_runs(out, RUNS)
    with_fid = fid_available(args)
    t_all = time.perf_counter()
    report: dict = {"demo": "pixel", "torch_threads": torch.get_num_threads()}

    trainer = Trainer(demo_config(args))
    guide_step = max(1, round(args.guide_at * args.steps)) if args.guide_at and args.guidance != 1.0 else 0
    kept: dict[str, torch.nn.Module] = {}
    if guide_step:

        def keep_guide(trainer: Trainer, step: int) -> None:
            if step == guide_step:
                kept["ema"] = copy.deepcopy(trainer.ema)

        trainer.on_step_end = keep_guide
    result = trainer.fit()
    report.update(
        steps=result.step,
        train_seconds=round(result.train_seconds, 1),
        final_loss=result.loss,
        images_seen=result.step * args.batch_size,
        model=str(result.export_dir),
    )

    guide = kept.get("ema")
    if guide is not None:
        path = export_inference(guide, trainer.config.diffusion, trainer.run_dir / GUIDE_DIR)
        report.update(guide_step=guide_step, guide=str(path), guide_labels=args.guide_labels)
    elif guide_step:
        print(f"note: training stopped at step {result.step}, before the guide's step {guide_step} (--guide-at "
              f"{args.guide_at:g}): classifier-free guidance instead", file=sys.stderr)  # fmt: skip

    guide_labels = args.guide_labels if guide is not None else "class"  # no guide (guidance 1, or stopped early)

    def sample(n: int, seed: int, guidance: float) -> torch.Tensor:
        labels = trainer.preview_labels(n)
        return trainer.sample(n, steps=args.sample_steps, seed=seed, class_labels=labels, guidance_scale=guidance,
                              sampler=args.sampler, guide=guide, guide_labels=guide_labels)

    guided_by = {"autoguidance_guide_step": guide_step, "guide_labels": args.guide_labels} if guide is not None else {}
    report.update(grid_of_samples(sample, out, args, guided_by))
    if with_fid:
        report.update(heldout_fid(lambda n, seed: sample(n, seed, args.fid_guidance), args))
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_report(out, report)
    print_report(report, "diffusekit demo")
    return 0
