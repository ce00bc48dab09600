"""Running the command line inside a test: ``main(argv)`` with its exit status, printed paths and stderr."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.main import main


def run(argv: list[str], capsys) -> tuple[int, list[Path], str]:
    """main(argv) -> (exit status, paths it printed, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, [Path(line) for line in captured.out.splitlines() if line], captured.err
