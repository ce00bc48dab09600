"""``diffusekit convert``: between single-file SD-1.x checkpoints and diffusers-layout model folders.

* file -> folder: ``diffusekit convert model.safetensors out_folder --tokenizer TOKENIZER_DIR``
* folder -> file: ``diffusekit convert model_folder model.safetensors``
* file -> file: ``diffusekit convert --allow-pickle model.ckpt model.safetensors`` (same keys, safe format)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.atomic import check_writable_folder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_EPILOG = """what is converted:
  single file -> folder   the U-Net, VAE and text encoder, plus the tokenizer from --tokenizer (single
                          files carry none) and SD-1.x's PNDM scheduler config
  folder -> single file   the three networks in the CompVis key layout; the tokenizer is not stored, so
                          pass --tokenizer FOLDER/tokenizer when loading the file. Our exact configs go
                          into the file's metadata, so it loads back into the same networks.
  single file -> .safetensors   a pickled .ckpt/.pt rewritten as safetensors with the same keys (needs
                          --allow-pickle); or a .safetensors file cast with --dtype

examples:
  diffusekit convert v1-5-pruned-emaonly.safetensors sd15/ --tokenizer tokenizers/clip-vit-l-14
  diffusekit convert sd15/ sd15.safetensors --dtype float16
  diffusekit convert --allow-pickle v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    p = subparsers.add_parser(
        "convert",
        help="convert between single-file checkpoints and diffusers model folders",
        description="Convert a Stable Diffusion 1.x model between a single checkpoint file (CompVis layout, "
        ".safetensors, or a .ckpt with --allow-pickle) and a diffusers-layout model folder. The direction "
        "follows from SRC and DST: a folder SRC makes a .safetensors file; a file SRC makes a folder, or a "
        ".safetensors file when DST ends in .safetensors.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="a model folder, or a single-file checkpoint (.safetensors, .ckpt)")
    p.add_argument("dest", metavar="DST",
                   help="the output: a new (or empty) folder, or a .safetensors file")  # fmt: skip
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (vocab.json + merges.txt) to put into the output folder; required when "
                   "SRC is a single file and DST a folder")  # fmt: skip
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickled .ckpt/.pt SRC with torch.load(weights_only=True). Pickles can run code: "
                   "convert only files from sources you trust")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="precision of the written weights (default: as the source stores them; folder sources "
                   "are read as float32). float16 halves the size. A VAE written into a folder stays "
                   "float32")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST file (an existing non-empty DST folder is never replaced)")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``diffusekit convert``; returns the exit status."""
    from diffusekit.pipelines.loading import Layout, identify, load_pipeline, save_pipeline

    src, dst = Path(args.source), Path(args.dest)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        kind = identify(src)
    except WeightsError as e:  # its messages start with the path
        raise WeightsError(f"SRC {e}") from None
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer {args.tokenizer}: no such folder (a folder with vocab.json and merges.txt)")
    _check_writable_parent(dst)
    if kind.layout is Layout.FOLDER:
        if dst.suffix != ".safetensors":
            raise ConfigError(f"DST {dst}: converting a folder makes a single file; DST must end in .safetensors")
        _check_file_destination(dst, args.overwrite)
        save_pipeline(load_pipeline(src, fast=False), dst, dtype=dtype)
        # SDXL needs both tokenizers: the model folder holds tokenizer/ and tokenizer_2/
        tokenizer = src if (src / "tokenizer_2").is_dir() else src / "tokenizer"
        print(f"wrote {dst} (no tokenizer inside: load it with --tokenizer {tokenizer})", file=sys.stderr)
    elif dst.suffix == ".safetensors":
        if dst.resolve() == src.resolve():
            raise ConfigError(f"DST {dst} is SRC; choose another output file")
        _check_file_destination(dst, args.overwrite)
        _rewrite(src, dst, args.allow_pickle, dtype)
        print(f"wrote {dst}", file=sys.stderr)
    else:
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise ConfigError(f"DST {dst} exists and is not an empty folder; choose a new folder")
        if args.tokenizer is None:
            raise ConfigError(
                f"SRC {src} is a single file, which carries no tokenizer; pass --tokenizer DIR (a folder with "
                "vocab.json and merges.txt, e.g. the tokenizer/ folder of any SD-1.x model)"
            )
        # in the precision the file stores (dtype None) unless --dtype says otherwise
        sd = load_pipeline(src, tokenizer=args.tokenizer, allow_pickle=args.allow_pickle, dtype=dtype, fast=False)
        save_pipeline(sd, dst)
        print(f"wrote {dst}/", file=sys.stderr)
    return 0


def _check_writable_parent(dst: Path) -> None:
    """DST's folder exists (or can be made) and takes new files: checked before any weight is read."""
    check_writable_folder(dst.parent, f"DST {dst}")


def _check_file_destination(dst: Path, overwrite: bool) -> None:
    if dst.is_dir():
        raise ConfigError(f"DST {dst} is a folder; name a .safetensors file")
    if dst.exists() and not overwrite:
        raise ConfigError(f"DST {dst} exists; pass --overwrite to replace it")


def _rewrite(src: Path, dst: Path, allow_pickle: bool, dtype: torch.dtype | None) -> None:
    """Every tensor of ``src`` into a safetensors ``dst`` with the same keys (cast to ``dtype`` if given)."""
    from diffusekit.io.single_file import read_single_file
    from diffusekit.io.weights import save_weights

    state, metadata = read_single_file(src, allow_pickle=allow_pickle)
    out = {}
    storages: set[int] = set()
    for key in sorted(state):
        v = state.pop(key)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        ptr = v.untyped_storage().data_ptr()
        if ptr in storages:  # pickles may share storage between tensors; safetensors stores each on its own
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        out[key] = v.contiguous()
    save_weights(out, dst, metadata={**metadata, "format": "pt"})  # keeps a diffusekit file's configs


__all__ = ["add_parser", "run_convert"]
