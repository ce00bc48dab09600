"""The ``diffusekit`` command: one sub-command per module in this package, wired explicitly."""

from __future__ import annotations

import argparse
import sys

from diffusekit.cli import bench, convert, demo, fid, generate, sample, train, upscale
from diffusekit.errors import DiffusekitError

# each module adds its sub-command(s) with add_parser(subparsers); generate adds txt2img, img2img, inpaint
COMMAND_MODULES = (demo, train, sample, fid, generate, upscale, convert, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusekit",
        description="Train, sample and evaluate diffusion models (DDPM, DDIM, Stable Diffusion) on PyTorch.",
        epilog="Run 'diffusekit COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except DiffusekitError as e:
        print(f"diffusekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffusekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
