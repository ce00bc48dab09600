"""``diffusekit train-lora MODEL DATA --output FILE.safetensors``: LoRA fine-tuning of an SD-1.x/2.x or SDXL model
on a folder of captioned images."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusekit.cli import train_common as common
from diffusekit.training.config import LR_SCHEDULES, MIXED_PRECISION
from diffusekit.training.lora_config import FORMATS, TARGETS, LoraTrainConfig

DESCRIPTION = """\
Fine-tune a Stable Diffusion model (SD-1.x/2.x or SDXL; a diffusers-layout folder or a single .safetensors
file) with LoRA adapters (Hu et al. 2021): small low-rank updates (alpha / rank) B A on chosen layers of the
U-Net, and optionally of the text encoder(s), trained on your images while the model itself stays frozen.

DATA is a folder of images (PNG, JPEG, WebP, ...; sub-folders are read too). Each image is captioned by a UTF-8
text file of the same name beside it (cat.png + cat.txt, the convention of kohya's and other trainers); images
without one take --caption, and without --caption such a folder is refused. An empty caption trains the
empty prompt. Images are resized so their shorter side is --resolution-px, then centre-cropped to a square.

The frozen VAE encodes every image once; the latents are cached in the run folder (latents.safetensors) and
reused only for the same VAE, images and settings. Each step draws a noise level on the model's own training
schedule and trains the adapters to predict the model's own target (epsilon or v, from its scheduler config);
SDXL is conditioned as its pipeline does it (both text encoders, the pooled embedding, and each image's
original size and crop as micro-conditioning).

The result is one .safetensors file in the kohya layout (lora_unet_*, lora_te_* with .lora_down, .lora_up,
.alpha; what A1111, ComfyUI and kohya's tools read) or with --format peft the layout of the reference's
save_lora_weights; load it with 'diffusekit txt2img --lora FILE'. An existing file is never replaced without
--overwrite. The run folder (--output-dir) holds checkpoints of the adapters and optimizer only (not the base
model; resumable bit for bit with --resume), metrics.jsonl, loss_curve.png and samples/.

Ctrl-C stops after the current step and saves a checkpoint. Several processes or GPUs: torchrun
--nproc_per_node N -m diffusekit train-lora ... (DDP; --batch-size is per process)."""

EPILOG = """\
examples:
  diffusekit train-lora models/sd15 photos/ --output style.safetensors --steps 1000
  diffusekit train-lora models/sd15 dog/ --caption "a photo of sks dog" --output dog.safetensors --rank 8
  diffusekit train-lora models/sdxl photos/ --resolution-px 1024 --mixed-precision bf16 --gradient-checkpointing \\
      --output xl.safetensors
  diffusekit train-lora models/sd15 photos/ --output style.safetensors --resume --steps 2000 --overwrite
  diffusekit txt2img "a portrait, in my style" --model models/sd15 --lora style.safetensors:0.8 --out images/"""

# option -> (section, field)
_FIELDS = {
    "tokenizer": ("lora", "tokenizer"), "rank": ("lora", "rank"), "alpha": ("lora", "alpha"),
    "targets": ("lora", "targets"), "train_text_encoder": ("lora", "train_text_encoder"),
    "text_encoder_lr": ("lora", "text_encoder_lr"), "gradient_checkpointing": ("lora", "gradient_checkpointing"),
    "caption_dropout": ("lora", "caption_dropout"), "min_snr_gamma": ("lora", "min_snr_gamma"),
    "format": ("lora", "format"),
    "caption": ("data", "caption"), "resolution_px": ("data", "resolution"), "random_flip": ("data", "random_flip"),
    "skip_bad_images": ("data", "skip_bad_images"),
    **common.OPTIM_FIELDS,
    **common.RUN_FIELDS,
    "max_minutes": ("run", "max_minutes"), "output_dir": ("run", "output_dir"),
}  # fmt: skip
# spellings of earlier versions that still parse (hidden from --help) -> the option's name now
FORMER_SPELLINGS = {"--resolution": "--resolution-px", "--run-dir": "--output-dir"}
# config names in library messages -> what a user of this command types
_OPTION_NAMES = common.option_names(_FIELDS, {"lora.model": "MODEL", "data.source": "DATA", "lora.output": "--output"})
# options that name a path -> their args attribute: a message about that path names the option
_PATHS = {"--resume": "resume", "MODEL": "model", "DATA": "data", "--output": "output", "--tokenizer": "tokenizer",
          "--output-dir": "output_dir"}  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-lora",
        help="fine-tune a Stable Diffusion model with LoRA adapters on captioned images",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="SD-1.x/2.x or SDXL model folder (diffusers layout) or single file")
    p.add_argument("data", metavar="DATA", help="folder of images, each with a caption .txt of the same name")
    p.add_argument("--output", required=True, metavar="FILE.safetensors", help="the LoRA file written at the end")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--format", choices=FORMATS,
                   help="kohya: lora_unet_*/lora_te_* keys (A1111, ComfyUI, kohya); peft: the reference's "
                        "pytorch_lora_weights layout")  # fmt: skip
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder, for a single-file MODEL (which has none)")
    g = p.add_argument_group("adapters")
    g.add_argument("--rank", type=int, metavar="R", help="rank r of each update B A (1 and up; 4-32 is usual)")
    g.add_argument("--alpha", type=float, metavar="A",
                   help="the update is scaled by alpha / rank (default: alpha = rank, scale 1)")  # fmt: skip
    g.add_argument("--targets", choices=TARGETS,
                   help="attention: the q/k/v/out projections of the U-Net's attentions; transformer: every "
                        "linear layer and 1x1 convolution of its transformer layers (kohya's set)")  # fmt: skip
    g.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="adapters on the text encoder(s) too (attention projections and MLPs)")  # fmt: skip
    g.add_argument("--text-encoder-lr", type=float, metavar="LR",
                   help="learning rate of the text-encoder adapters (default: --lr)")  # fmt: skip
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute U-Net activations in the backward pass: less memory, ~30%% more time")  # fmt: skip
    g = p.add_argument_group("data")
    g.add_argument("--caption", metavar="TEXT", help="caption of every image that has no .txt file")
    g.add_argument("--resolution-px", type=int, metavar="PX",
                   help="square training size, a multiple of the model's latent multiple (default: the model's "
                        "own, 512 for SD-1.x, 1024 for SDXL)")  # fmt: skip
    g.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (both flips are encoded once)")  # fmt: skip
    g.add_argument("--caption-dropout", type=float, metavar="P",
                   help="probability of training an image with the empty prompt (keeps guidance working)")  # fmt: skip
    g.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="train without images or caption files that cannot be read (they are listed); without "
                        "this option such a folder is refused")  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train to")
    g.add_argument("--max-minutes", type=float, metavar="M", help="wall-clock training budget of this invocation")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per micro-batch per process")
    g.add_argument("--grad-accum-steps", type=int, metavar="N", help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate of the adapters")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear LR warmup")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warmup")
    g.add_argument("--min-snr-gamma", type=float, metavar="G", help="Min-SNR-gamma loss weighting (e.g. 5)")
    g.add_argument("--ema-decay", type=float, metavar="D", help="EMA of the adapters written at the end (0 = off)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help="autocast: auto = bf16 where the device has it, else float32 (fp16 with loss scaling on "
                        "older GPUs)")  # fmt: skip
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", metavar="DIR",
                   help="run folder: checkpoints, latent cache, metrics and samples (default: --output's name "
                        "with '.run' instead of '.safetensors')")  # fmt: skip
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue a run: without a value, the newest intact checkpoint in --output-dir; or a "
                        "checkpoint folder. The checkpoint's adapter, data and optimiser settings are used; only "
                        "run options (steps, minutes, intervals) and --output may change")  # fmt: skip
    g.add_argument("--seed", type=int, metavar="N", help="seed of the adapters' initial weights, the data order "
                   "and the noise")  # fmt: skip
    g.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--cpu-threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    common.add_interval_options(g, sample_help="a grid of images for the first captions every N steps (0 = off)")
    common.add_display_switches(g)
    common.show_option_rules(p)
    common.show_defaults(p, LoraTrainConfig().to_dict(), _FIELDS)  # LoraTrainConfig: the one source of defaults
    common.add_former_spellings(p, FORMER_SPELLINGS)
    p.set_defaults(run=run)
    return p


def default_run_dir(output: str) -> str:
    """style.safetensors -> style.run (beside the output)."""
    path = Path(output)
    return str(path.with_name(path.stem + ".run"))


def config_from_args(args: argparse.Namespace) -> LoraTrainConfig:
    """The fine-tuning defaults, then every option that was given."""
    d = LoraTrainConfig().to_dict()
    d["lora"].update(model=args.model, output=args.output)
    d["data"]["source"] = args.data
    d["run"]["output_dir"] = default_run_dir(args.output)
    for section, values in common.changes_from_args(args, _FIELDS).items():
        d[section].update(values)
    return LoraTrainConfig.from_dict(d)


def _check_resumed_checkpoint(resume: str, run_dir: Path) -> None:
    """The checkpoint --resume continues (when there is one) must be a train-lora checkpoint."""
    from diffusekit.io.weights import read_json
    from diffusekit.training.checkpoint import latest_checkpoint, resolve_checkpoint
    from diffusekit.training.resume import CHECKPOINTS_DIR

    path = latest_checkpoint(run_dir / CHECKPOINTS_DIR) if resume == "latest" else resolve_checkpoint(resume)
    saved = read_json(path / "config.json").get("train") if path is not None else None
    if isinstance(saved, dict):
        common.check_trained_by(saved, path, "train-lora")


def run(args: argparse.Namespace) -> int:
    return common.run_naming_options(_run, args, _OPTION_NAMES, _PATHS)  # say --rank, not lora.rank


def _run(args: argparse.Namespace) -> int:
    from diffusekit.io.atomic import check_writable_folder
    from diffusekit.training.lora_trainer import LoraTrainer, check_output

    common.check_options(args)
    config = config_from_args(args)
    check_output(args.output, args.overwrite, "--output")
    output_folder = Path(args.output).parent  # the file is written at the end: its folder is checked now
    check_writable_folder(output_folder, f"--output {args.output} (its folder {output_folder})")
    run_dir = config.run.output_dir
    # without --output-dir the run folder is derived from --output: messages name the option the user gave
    where = None if args.output_dir is not None else f"the run folder {run_dir} (beside --output {args.output})"
    common.prepare_run(args, run_dir, "--output-dir", data=config.data.source, data_option="DATA", where=where)
    if where is not None:
        check_writable_folder(run_dir, where)
    if args.resume is not None:  # the trainer reads the checkpoint's config itself
        _check_resumed_checkpoint(args.resume, Path(config.run.output_dir))
        common.ignored_on_resume(args, _FIELDS, _OPTION_NAMES)
    trainer = LoraTrainer(config, resume=args.resume, output=args.output, overwrite=args.overwrite)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.env.is_main:
        print(
            f"{common.summary_line(result)}\n"
            f"  LoRA file:  {result.export_dir}\n  checkpoint: {result.checkpoint}\n"
            f"{common.metrics_line(result)}\n"
            f"generate with: diffusekit txt2img \"PROMPT\" --model {args.model} --lora {result.export_dir} --out DIR"
        )
    return common.finish(trainer.env, result, f"interrupted at step {result.step}; the checkpoint is saved. Resume "
                                              "with the same command and --resume --overwrite")  # fmt: skip
