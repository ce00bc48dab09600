"""``diffusekit train-vae``: train the KL autoencoder of latent diffusion on images, export it as a VAE folder."""

from __future__ import annotations

import argparse
import json

from diffusekit.cli import train_common as common
from diffusekit.errors import ConfigError
from diffusekit.training.config import LR_SCHEDULES, MIXED_PRECISION
from diffusekit.training.data_root import check_data_root
from diffusekit.training.vae_losses import RECONSTRUCTION_LOSSES
from diffusekit.training.vae_presets import vae_preset_names
from diffusekit.training.vae_train_config import VAETrainConfig

DESCRIPTION = """\
Train the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G) on
images, and save it as a VAE folder in the reference (diffusers AutoencoderKL) layout that the latent
pipelines load.

DATA is a folder of PNG/JPEG images, MNIST-format IDX files, a .npz/.npy array, the named datasets mnist and
fashion-mnist, or 'bundled' (the MNIST subset that ships with diffusekit). Images are resized and
centre-cropped to --resolution-px, which must be a multiple of the autoencoder's downsampling factor.

The encoder maps an image to a diagonal Gaussian over latents --downsample-factor times smaller with
--latent-channels channels; the decoder maps latents back. The loss is the per-pixel reconstruction error
(--reconstruction-loss l1 or l2) plus --kl-weight times the KL divergence to N(0, I) summed over the latent
(the paper's regulariser, ~1e-6). --adversarial adds a PatchGAN discriminator with the hinge loss and the
adaptive weight of Esser et al. 2021 from --adversarial-start-steps on (off by default). The paper's
perceptual (LPIPS) loss needs pretrained network weights that are not shipped, so it is not offered.

Settings come from the defaults, then --config FILE (JSON or TOML with sections [data], [vae], [loss],
[optim], [ema], [run]; see diffusekit.training.vae_train_config), then the options below.

The run folder (--output-dir) receives checkpoints/step-NNNNNNNN/ (atomic, resumable bit for bit, also after
a kill), vae/ (the EMA weights: config.json and diffusion_pytorch_model.safetensors, whose scaling_factor is
1 / the standard deviation of posterior samples of --scaling-examples training images), metrics.jsonl,
loss_curve.png, samples/ (originals | reconstructions) and, when tensorboard is installed, tensorboard/ with
the same grids.

Ctrl-C stops after the current step and saves a checkpoint. Several processes or GPUs:
torchrun --nproc_per_node N -m diffusekit train-vae ... (DDP; --batch-size is per process)."""

EPILOG = """\
examples:
  diffusekit train-vae fashion-mnist --output-dir runs/vae-fashion --steps 5000        # f=4: 28 -> 7x7x4
  diffusekit train-vae ./photos --resolution-px 256 --preset kl-f8 --batch-size 8 --output-dir runs/vae256
  diffusekit train-vae bundled --max-minutes 10 --output-dir runs/vae-digits --kl-weight 1e-5
  diffusekit train-vae --resume --output-dir runs/vae-fashion --steps 10000            # continue the newest
  torchrun --nproc_per_node 2 -m diffusekit train-vae ./photos --config vae.toml"""

# option -> (section, field) of VAETrainConfig
FIELDS = {
    **common.DATA_FIELDS,
    "preset": ("vae", "preset"), "latent_channels": ("vae", "latent_channels"),
    "downsample_factor": ("vae", "downsample_factor"), "scaling_examples": ("vae", "scaling_examples"),
    "reconstruction_loss": ("loss", "reconstruction"), "kl_weight": ("loss", "kl_weight"),
    "sample_posterior": ("loss", "sample_posterior"), "adversarial": ("loss", "adversarial"),
    "adversarial_start_steps": ("loss", "adversarial_start"), "adversarial_weight": ("loss", "adversarial_weight"),
    "discriminator_layers": ("loss", "discriminator_layers"),
    **common.OPTIM_FIELDS,
    **common.RUN_FIELDS,
    "max_minutes": ("run", "max_minutes"), "output_dir": ("run", "output_dir"),
    "preview_images": ("run", "num_sample_images"),
}  # fmt: skip
# spellings of earlier versions that still parse (hidden from --help) -> the option's name now
FORMER_SPELLINGS = {"--train-minutes": "--max-minutes"}
# config names in library messages -> the options a user of this command types
OPTION_NAMES = common.option_names(FIELDS, {"data.source": "DATA"})
# options that name a path -> their args attribute: a message about that path names the option
PATHS = {"--resume": "resume", "DATA": "data", "--config": "config", "--output-dir": "output_dir",
         "--data-root": "data_root"}  # fmt: skip
# what the run writes into RUN/vae, which it replaces whole
EXPORT = ("vae", frozenset({"config.json", "diffusion_pytorch_model.safetensors"}))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-vae",
        help="train a latent-diffusion autoencoder (VAE) on images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="bundled | mnist | fashion-mnist | image folder | IDX file | .npz/.npy (not needed with "
                        "--resume)")  # fmt: skip
    p.add_argument("--config", metavar="FILE", help="JSON or TOML train-vae config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g = p.add_argument_group("data")
    common.add_data_options(g, resolution_help="square training size, a multiple of the downsampling factor "
                                               "(default: the data's)")  # fmt: skip
    g = p.add_argument_group("autoencoder")
    g.add_argument("--preset", choices=vae_preset_names(),
                   help="architecture: mnist-f4 (28x28 data), kl-f8 (the paper's and SD's f=8, for 256px and up), "
                        "test-tiny (tests)")  # fmt: skip
    g.add_argument("--latent-channels", type=int, metavar="N", help="channels of the latents (default: the preset's)")
    g.add_argument("--downsample-factor", type=int, metavar="F",
                   help="image side / latent side, a power of two (default: the preset's)")  # fmt: skip
    g.add_argument("--scaling-examples", type=int, metavar="N",
                   help="training images the exported scaling_factor (1 / latent std) is measured on")  # fmt: skip
    g = p.add_argument_group("loss")
    g.add_argument("--reconstruction-loss", choices=RECONSTRUCTION_LOSSES, help="per-pixel |x - x_hat| or squared")
    g.add_argument("--kl-weight", type=float, metavar="W",
                   help="weight of the KL divergence summed over the latent, relative to the reconstruction "
                        "error summed over pixels (sensible: 1e-6 to 1e-4)")  # fmt: skip
    g.add_argument("--sample-posterior", action=argparse.BooleanOptionalAction, default=None,
                   help="decode latents sampled from the posterior (off: decode its mean)")  # fmt: skip
    g.add_argument("--adversarial", action="store_true", default=None,
                   help="add the PatchGAN hinge loss with the adaptive weight (default: off)")  # fmt: skip
    g.add_argument("--adversarial-start-steps", type=int, metavar="N", help="step at which the adversarial term starts")
    g.add_argument("--adversarial-weight", type=float, metavar="W", help="factor on the adaptive weight")
    g.add_argument("--discriminator-layers", type=int, metavar="N",
                   help="stride-2 layers of the discriminator; images need at least 3 * 2^N pixels a side")  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train to")
    g.add_argument("--max-minutes", type=float, metavar="M", help="wall-clock training budget of this invocation")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per micro-batch per process")
    g.add_argument("--grad-accum-steps", type=int, metavar="N", help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear LR warmup")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warmup")
    g.add_argument("--ema-decay", type=float, metavar="D", help="maximum EMA decay (the EMA weights are exported)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help="autocast: auto = bf16 where the device has it, else float32 (fp16 with loss scaling on "
                        "older GPUs)")  # fmt: skip
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", metavar="DIR", help="run folder")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue a run: without a value, the newest intact checkpoint in --output-dir; or a "
                        "checkpoint / run folder. Only run options (steps, minutes, intervals) may change")  # fmt: skip
    g.add_argument("--seed", type=int, metavar="N", help="seed of the weights, the data order and the noise")
    g.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--cpu-threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")  # fmt: skip
    common.add_interval_options(g, sample_help="reconstruction grids (0 = off)")
    g.add_argument("--preview-images", type=int, metavar="N", help="images in each reconstruction grid")
    common.add_display_switches(g)
    common.show_option_rules(p)
    common.show_defaults(p, VAETrainConfig().to_dict(), FIELDS)  # VAETrainConfig: the one source of defaults
    common.add_former_spellings(p, FORMER_SPELLINGS)
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace) -> VAETrainConfig:
    """Defaults, then the --config file, then every option that was given."""
    config = VAETrainConfig.load(args.config) if args.config else VAETrainConfig()
    changes = common.changes_from_args(args, FIELDS)
    return config.replace(**changes) if changes else config.validate()


def run(args: argparse.Namespace) -> int:
    return common.run_naming_options(_run, args, OPTION_NAMES, PATHS)  # say --resolution-px, not data.resolution


def _run(args: argparse.Namespace) -> int:
    from diffusekit.training.vae_trainer import VAETrainer

    common.check_options(args)  # --print-config too
    if args.data_root is not None:
        check_data_root(args.data_root, "--data-root")
    if args.data is None and args.resume is None and not args.print_config:
        raise ConfigError("DATA is required (a folder of images, an IDX or .npz/.npy file, mnist, fashion-mnist or "
                          "bundled), unless --resume continues a run")  # fmt: skip
    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    common.prepare_run(args, config.run.output_dir, "--output-dir", data=config.data.source, data_option="DATA",
                       export=EXPORT)  # fmt: skip
    resume = None
    if args.resume is not None:
        config, resume = common.resume_config(args, config, FIELDS, OPTION_NAMES, VAETrainConfig.from_dict,
                                              "train-vae")  # fmt: skip
    trainer = VAETrainer(config, resume=resume)
    result = trainer.fit()
    if trainer.env.is_main:
        std, factor = trainer.last_scaling or (float("nan"), float("nan"))
        print(
            f"{common.summary_line(result)}\n  checkpoint: {result.checkpoint}\n"
            f"  VAE folder: {result.export_dir} (EMA weights; latent std {std:.4g} -> scaling_factor {factor:.5g})\n"
            f"{common.metrics_line(result)}"
        )
    return common.finish(trainer.env, result, common.interrupted_note(result, trainer.env.world_size, "train-vae"))
