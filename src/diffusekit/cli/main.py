"""The ``diffusekit`` command: one sub-command per module in this package, wired explicitly."""

from __future__ import annotations

import argparse
import importlib
import sys

from diffusekit.errors import DiffusekitError

# sub-command -> module in diffusekit.cli that defines add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "demo": "demo",
    "train": "train",
    "sample": "sample",
    "fid": "fid",
    "txt2img": "generate",
    "img2img": "generate",
    "inpaint": "generate",
    "convert": "convert",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusekit",
        description="Train, sample and evaluate diffusion models (DDPM, DDIM, Stable Diffusion) on PyTorch.",
        epilog="Run 'diffusekit COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for module_name in COMMANDS.values():
        if module_name in seen:
            continue
        seen.add(module_name)
        try:
            module = importlib.import_module(f"diffusekit.cli.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"diffusekit.cli.{module_name}":
                continue  # command not built yet
            raise
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
