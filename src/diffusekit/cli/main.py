"""The ``diffusekit`` command: one sub-command per module in this package, wired explicitly."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

from diffusekit import __version__
from diffusekit.errors import DiffusekitError


def command_modules() -> tuple[ModuleType, ...]:
    """The modules of the sub-commands, in --help order; each adds its sub-command(s) with
    add_parser(subparsers) (generate adds txt2img, img2img, inpaint). Imported here, not when this module is
    imported: they import torch, which takes seconds, and a Ctrl-C meanwhile must end in one line, which only
    ``main`` can print."""
    from diffusekit.cli import (
        bench,
        convert,
        demo,
        ema_reconstruct,
        fid,
        generate,
        sample,
        serve,
        train,
        train_lora,
        train_vae,
        upscale,
    )

    return (demo, train, train_vae, train_lora, ema_reconstruct, sample, fid, generate, upscale, convert, bench,
            serve)  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse with one addition: an option whose value starts with '-' (``--size -16x16``, ``--seed -1``)
    is taken by argparse for another option; the error then says how to pass such a value."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.match(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        if m and m.group(1).startswith("--"):
            message += f" (to give a value that starts with '-', write {m.group(1)}=VALUE)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="diffusekit",
        description="Train, sample and evaluate diffusion models (DDPM, DDIM, Stable Diffusion) on PyTorch.",
        epilog="Run 'diffusekit COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"diffusekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.add_parser(sub)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' signature
    """A warning as the CLI prints it: ``diffusekit: warning: MESSAGE`` on one line, without the source line
    and file position Python shows by default (those are for developers, and confuse users)."""
    text = " ".join(str(message).split())
    return f"diffusekit: warning: {text}\n"


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """Within the block, warnings print as one line each (``format_warning``); restored afterwards, so the
    library used from Python keeps the usual format."""
    before = warnings.formatwarning
    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = before


def main(argv: list[str] | None = None) -> int:
    try:  # building the parser imports torch and every command: Ctrl-C there is one line too
        parser = build_parser()
    except KeyboardInterrupt:
        print("diffusekit: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    with cli_warnings():
        try:
            from diffusekit.io.atomic import write_bytes_atomic
            from diffusekit.runtime import autotune

            # measured kernel choices are kept across runs in the user cache folder, written atomically
            autotune.configure(writer=write_bytes_atomic)
            return int(args.run(args) or 0)
        except DiffusekitError as e:
            print(f"diffusekit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"diffusekit {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
