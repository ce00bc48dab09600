"""Every script in benchmarks/ imports: its module-level imports name modules and functions that exist (the
scripts are run by hand, rarely, so a moved module would otherwise break them unnoticed). Importing runs
nothing else: each script's work sits behind ``if __name__ == "__main__"``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_the_scripts_are_found():
    assert {"quality_mnist.py", "sr_fashion.py", "fastconv_sweep.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports(script: Path):
    text = script.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in text  # importing must not run the benchmark
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None))
