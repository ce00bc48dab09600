"""``diffusekit train``: train a diffusion U-Net from a config file and/or options, on pixels or (``--latent``) on
the latents of a frozen VAE."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from diffusekit.cli import train_common as common
from diffusekit.diffusion.edm import PRECONDITIONINGS
from diffusekit.diffusion.parametrization import PREDICTION_TYPES
from diffusekit.diffusion.schedules import BETA_SCHEDULES
from diffusekit.errors import ConfigError
from diffusekit.pipelines.super_resolution import DOWNSAMPLE_MODES
from diffusekit.training.config import LR_SCHEDULES, MIXED_PRECISION, TASKS, TrainConfig, read_config_file
from diffusekit.training.data_root import check_data_root
from diffusekit.training.latent_config import CONDITIONINGS, POSTERIORS, LatentConfig, LatentTrainConfig
from diffusekit.training.power_ema import EMA_KINDS
from diffusekit.training.presets import preset_names

DESCRIPTION = """\
Train a diffusion model (DDPM, Ho et al. 2020) on images: a folder of PNG/JPEG files (class sub-folders
become class labels), MNIST-format IDX files, a .npz/.npy array, the named datasets mnist and fashion-mnist,
or the MNIST subset that ships with diffusekit (the default).

Settings come from the defaults, then --config FILE (JSON or TOML with sections [data], [model],
[diffusion], [optim], [ema], [run], [task]; see diffusekit.training.config), then the options below. The full
config is saved into every checkpoint.

The run folder (--output-dir) receives checkpoints/step-NNNNNNNN/ (atomic, resumable bit for bit),
model/ (the EMA weights as an inference folder for `diffusekit sample`), metrics.jsonl, loss_curve.png,
samples/ and, when tensorboard is installed, tensorboard/.

Ctrl-C stops after the current step, saves a checkpoint and prints the command that resumes the run
(a second Ctrl-C quits at once without saving). Sizes are checked before anything is loaded: a batch whose
estimated memory exceeds the device's is refused with the estimate.

Latent diffusion (--latent VAE_FOLDER): the images are encoded once by the frozen VAE (latents cached in the
run folder, flips encoded in pixel space; a cache of another VAE or other data is rebuilt), the U-Net trains
on them, conditioned on class labels or on captions (image.txt beside image.png, or --caption for all) through
a CLIP text encoder trained from scratch on a BPE vocabulary of the captions, or a frozen --text-encoder.
model/ is then a complete pipeline folder (with vae/; text_encoder/ and tokenizer/ for captions) for
`diffusekit sample` (classes) or `diffusekit txt2img` (captions). The config file's [latent] section holds
these settings (see diffusekit.training.latent_config); --task does not apply, and the defaults of --preset
and --beta-schedule become latent-small and scaled_linear (Stable Diffusion's schedule).

Several processes or GPUs: torchrun --nproc_per_node N -m diffusekit train ... (DDP; --batch-size is per
process)."""

EPILOG = """\
examples:
  diffusekit train --steps 2000 --output-dir runs/digits
  diffusekit train --data fashion-mnist --preset mnist-base --max-minutes 30 --output-dir runs/fashion
  diffusekit train --data ./photos --resolution-px 64 --preset ddpm-cifar10 --batch-size 32
  diffusekit train --resume --output-dir runs/digits --steps 4000      # continue the newest checkpoint
  diffusekit train --task super-resolution --scale 4 --data fashion-mnist --output-dir runs/sr   # 7 -> 28 px
  diffusekit train --latent runs/vae/model --data fashion-mnist --resolution-px 32 --output-dir runs/ldm
  diffusekit train --latent runs/vae/model --data ./captioned --preset latent-small --output-dir runs/t2i
  torchrun --nproc_per_node 2 -m diffusekit train --config run.toml"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a diffusion model on images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="JSON or TOML training config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        metavar="SOURCE",
        help="bundled | mnist | fashion-mnist | image folder | IDX file | .npz/.npy (or give it as DATA)",
    )
    g.add_argument("data_positional", nargs="?", metavar="DATA",
                   help="the training data, as --data SOURCE (as train-vae and train-lora take it)")  # fmt: skip
    common.add_data_options(g, resolution_help="square training size (default: the data's)")
    g = p.add_argument_group("model and loss")
    g.add_argument("--preset", choices=preset_names(), help="U-Net preset")
    g.add_argument(
        "--class-conditional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="condition on class labels (default: when the data has labels)",
    )
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, help="network target")
    g.add_argument("--preconditioning", choices=PRECONDITIONINGS,
                   help="edm: Karras et al. 2022 preconditioning, log-normal noise levels and loss weighting "
                        "(sampled with Heun on the Karras grid); none: the classic eps/x0/v target")  # fmt: skip
    g.add_argument("--sigma-data", type=float, metavar="S", help="edm: the data's standard deviation")
    g.add_argument("--beta-schedule", choices=BETA_SCHEDULES, help="noise schedule of the forward process")
    g.add_argument("--min-snr-gamma", type=float, metavar="G", help="Min-SNR-gamma loss weighting (e.g. 5)")
    g.add_argument("--offset-noise", type=float, metavar="S", help="offset-noise strength (e.g. 0.05)")
    g.add_argument(
        "--label-dropout",
        type=float,
        metavar="P",
        help="probability of dropping the class label, for classifier-free guidance",
    )
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=TASKS,
                   help="generate: images from noise; super-resolution: an SR3 upscaler whose input is the noisy "
                   "image with the degraded image (downsampled by --scale, upsampled back by bicubic "
                   "interpolation) stacked on; use it with 'diffusekit upscale'")  # fmt: skip
    g.add_argument("--scale", type=int, metavar="N", help="super-resolution: the upscaling factor, 2-16")
    g.add_argument("--downsample", choices=DOWNSAMPLE_MODES, help="super-resolution: how the inputs are made smaller")
    g.add_argument("--blur-sigma", type=float, metavar="PX",
                   help="super-resolution: Gaussian blur before downsampling, in pixels (0 = off)")  # fmt: skip
    g.add_argument("--degrade-noise", type=float, metavar="STD",
                   help="super-resolution: Gaussian noise added to the small image, on the [-1, 1] scale")  # fmt: skip
    g.add_argument("--noise-aug-levels", type=int, metavar="N",
                   help="super-resolution: noise the condition to a random level 0..N of the training schedule, "
                   "given to the network (0 = off); 'diffusekit upscale --noise-level' then picks one")  # fmt: skip
    g.add_argument("--crop-px", type=int, metavar="PX",
                   help="super-resolution: train on a random PX x PX window of each image (a new one every "
                   "step), a multiple of --scale; the model then tiles larger inputs (0 = the whole image, the "
                   "default)")  # fmt: skip
    g = p.add_argument_group("latent diffusion")
    g.add_argument("--latent", metavar="VAE_FOLDER",
                   help="train on the latents of this frozen VAE (a VAE folder or a pipeline folder holding vae/)")
    g.add_argument("--latent-cache", metavar="FILE", help="the latent cache (default: latents.safetensors in the run "
                   "folder); a cache of another VAE or other data is encoded again")
    g.add_argument("--posterior", choices=POSTERIORS, help="sample: a fresh z ~ q(z|x) each time an image is used "
                   "(as Stable Diffusion trains); mean: the posterior mean")
    g.add_argument("--conditioning", choices=CONDITIONINGS, help="auto: captions when the folder has .txt files or "
                   "--caption is given, else class labels when the data has them, else none")
    g.add_argument("--caption", metavar="TEXT", help="the caption of every image without a .txt file (an empty "
                   "text is the empty prompt)")
    g.add_argument("--text-encoder", metavar="FOLDER", help="a pretrained CLIP text encoder (a pipeline folder with "
                   "text_encoder/ and tokenizer/), kept frozen; default: one trained from scratch on the captions")
    g.add_argument("--vocab-size", type=int, metavar="N", help="tokens of the BPE vocabulary learned from the "
                   "captions (with the 514 byte and special tokens)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train to")
    g.add_argument("--max-minutes", type=float, metavar="M", help="wall-clock training budget of this invocation")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per micro-batch per process")
    g.add_argument("--grad-accum-steps", type=int, metavar="N", help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear LR warmup")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warmup")
    g.add_argument("--ema-decay", type=float, metavar="D", help="maximum EMA decay")
    g.add_argument("--ema-kind", choices=EMA_KINDS,
                   help="classic: the decay above; power: EDM2's power-function EMA at --ema-sigma-rels, saved "
                   "to RUN/ema_snapshots so that 'diffusekit ema-reconstruct' can pick the EMA length after "
                   "training")  # fmt: skip
    g.add_argument("--ema-sigma-rels", type=float, nargs="+", metavar="S",
                   help="power EMA: the lengths tracked, as fractions of the run in [0.0001, 0.28]; the first is "
                   "the one exported")  # fmt: skip
    g.add_argument("--ema-snapshot-every-steps", type=int, metavar="N", help="power EMA: snapshot interval")
    g.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="autocast: auto = bf16 where the device has it, else float32 (fp16 with loss scaling on older GPUs)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", metavar="DIR", help="run folder")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue a run: without a value, the newest intact checkpoint in --output-dir; or a "
        "checkpoint / run folder. Only run options (steps, minutes, intervals) may change",
    )
    g.add_argument("--seed", type=int, metavar="N", help="seed of the weights, the data order and the noise")
    g.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--cpu-threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice; on a machine busy with other work, 1 is often faster)",
    )
    common.add_interval_options(g, sample_help="EMA sample grids (0 = off)")
    common.add_display_switches(g)
    defaults = {**TrainConfig().to_dict(), "latent": dataclasses.asdict(LatentConfig())}
    common.show_option_rules(p)
    common.show_defaults(p, defaults, _FIELDS)  # TrainConfig and LatentConfig: the one source of defaults
    p.set_defaults(run=run)
    return p


# option -> (section, field)
_FIELDS = {
    **common.DATA_FIELDS,
    "preset": ("model", "preset"), "class_conditional": ("model", "class_conditional"),
    "prediction_type": ("diffusion", "prediction_type"), "beta_schedule": ("diffusion", "beta_schedule"),
    "preconditioning": ("diffusion", "preconditioning"), "sigma_data": ("diffusion", "sigma_data"),
    "min_snr_gamma": ("diffusion", "min_snr_gamma"), "offset_noise": ("diffusion", "offset_noise"),
    "label_dropout": ("diffusion", "label_dropout"),
    **common.OPTIM_FIELDS,
    "ema_kind": ("ema", "kind"), "ema_sigma_rels": ("ema", "sigma_rels"),
    "ema_snapshot_every_steps": ("ema", "snapshot_every"),
    **common.RUN_FIELDS,
    "max_minutes": ("run", "max_minutes"), "output_dir": ("run", "output_dir"),
    "task": ("task", "kind"), "scale": ("task", "scale"), "downsample": ("task", "downsample"),
    "blur_sigma": ("task", "blur_sigma"), "degrade_noise": ("task", "noise_std"),
    "noise_aug_levels": ("task", "max_noise_level"), "crop_px": ("task", "crop_px"),
    "latent": ("latent", "vae"), "latent_cache": ("latent", "cache"), "posterior": ("latent", "posterior"),
    "conditioning": ("latent", "conditioning"), "caption": ("latent", "caption"),
    "text_encoder": ("latent", "text_encoder"), "vocab_size": ("latent", "vocab_size"),
}  # fmt: skip
# config names in library messages -> the options a user of this command types
_OPTION_NAMES = common.option_names(_FIELDS)
# options that name a path -> their args attribute: a message about that path names the option
_PATHS = {"--resume": "resume", "--data": "data", "--latent": "latent", "--text-encoder": "text_encoder",
          "--latent-cache": "latent_cache", "--config": "config", "--output-dir": "output_dir",
          "--data-root": "data_root"}  # fmt: skip
# what the run writes into RUN/model, which it replaces whole (the latent pipeline's parts too)
_EXPORT = ("model", frozenset({"model_index.json", "scheduler", "unet", "vae", "text_encoder", "tokenizer"}))


def config_from_args(args: argparse.Namespace) -> TrainConfig | LatentTrainConfig:
    """Defaults, then the --config file, then every option that was given. A latent run (--latent, or a config
    file with a [latent] section) gives a LatentTrainConfig."""
    positional = getattr(args, "data_positional", None)
    if positional is not None:
        if args.data is not None and args.data != positional:
            raise ConfigError(f"the data is given twice: DATA {positional!r} and --data {args.data!r}; give one")
        args.data = positional
    data = read_config_file(args.config) if args.config else {}
    latent = getattr(args, "latent", None) is not None or "latent" in data
    kind = LatentTrainConfig if latent else TrainConfig
    config = kind.from_file_data(data, args.config) if args.config else kind()
    for option, (section, _) in _FIELDS.items():  # the options of the other kind of run
        other = section in ("latent", "task") and (section == "latent") != latent
        if other and getattr(args, option, None) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} applies to "
                              + ("latent runs only (add --latent VAE_FOLDER)" if section == "latent"
                                 else "pixel-space runs only, not with --latent"))  # fmt: skip
    changes = common.changes_from_args(args, _FIELDS)
    return config.replace(**changes) if changes else config.validate()


def _from_saved(saved: dict) -> TrainConfig | LatentTrainConfig:
    """A checkpoint's config, of the kind of run it trained."""
    return (LatentTrainConfig if "latent" in saved else TrainConfig).from_dict(saved)


def run(args: argparse.Namespace) -> int:
    return common.run_naming_options(_run, args, _OPTION_NAMES, _PATHS)  # say --steps, not run.max_steps


def _run(args: argparse.Namespace) -> int:
    from diffusekit.training.trainer import Trainer

    common.check_options(args)  # --print-config too
    if args.data_root is not None:
        check_data_root(args.data_root, "--data-root")
    config = config_from_args(args)
    if args.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=2))
        return 0
    common.prepare_run(args, config.run.output_dir, "--output-dir", data=config.data.source, export=_EXPORT)
    resume = None
    if args.resume is not None:
        config, resume = common.resume_config(args, config, _FIELDS, _OPTION_NAMES, _from_saved, "train")
    if isinstance(config, LatentTrainConfig):
        from diffusekit.training.latent_trainer import LatentTrainer as Trainer  # noqa: N814
    trainer = Trainer(config, resume=resume)
    result = trainer.fit()
    if trainer.env.is_main:
        print(
            f"{common.summary_line(result)}\n"
            f"  checkpoint: {result.checkpoint}\n  EMA model:  {result.export_dir}\n"
            f"{common.metrics_line(result)}\n"
            + _next_command(trainer, result.export_dir)
        )
    return common.finish(trainer.env, result, common.interrupted_note(result, trainer.env.world_size, "train"))


def _next_command(trainer, export_dir: Path | None) -> str:
    """The command that uses the exported model."""
    if getattr(trainer, "mode", None) == "text":
        size = trainer.dataset.resolution
        return (f"generate with: diffusekit txt2img --model {export_dir} \"a caption\" --size {size}x{size} "
                "--out DIR")
    if isinstance(trainer.config, TrainConfig) and trainer.config.task.kind == "super-resolution":
        return f"upscale with: diffusekit upscale --model {export_dir} IMAGE --out DIR"
    return f"sample with: diffusekit sample {export_dir} --n 64 --out grid.png"
