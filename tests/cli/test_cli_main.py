"""The top-level ``diffusekit`` command: --version, one-line warnings, values that start with '-'."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from diffusekit import __version__
from diffusekit.cli.main import cli_warnings, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"diffusekit {__version__}"


def test_warnings_format_as_one_line_and_the_library_format_is_restored():
    with cli_warnings():
        text = warnings.formatwarning("the cache\n  is read-only", UserWarning, "/x/features.py", 3, "warn(...)")
    assert text == "diffusekit: warning: the cache is read-only\n"
    assert warnings.formatwarning.__name__ == "formatwarning"  # restored for library users


def test_warnings_from_a_real_run_have_no_source_line():
    """A command that warns, run as a process: stderr holds the one line and no source code."""
    code = """
import sys, warnings
from diffusekit.cli import main as m
build = m.build_parser
def warning_command():
    parser = build()
    parser.set_defaults(run=lambda args: warnings.warn("heads up") or 0)
    return parser
m.build_parser = warning_command
sys.exit(m.main([]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "diffusekit: warning: heads up\n"


def test_a_value_starting_with_a_dash_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "model", "--out", "-x.png"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "argument --out: expected one argument" in err and "write --out=VALUE" in err


def test_bench_help_is_a_manual_page(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "issue" not in text.lower()
    assert "examples:" in text and "diffusekit bench --tiny" in text
    assert "(default: float32 bfloat16)" in text and "W3  SD-1.5 U-Net forward" in text
