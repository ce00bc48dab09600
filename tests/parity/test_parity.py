"""The parity runner over ../shared/fixtures: every case must be computed and pass (no SKIP)."""

from __future__ import annotations

import subprocess
import sys


def test_parity_runner_passes_every_fixture_case(fixtures_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusekit.parity", str(fixtures_dir)], capture_output=True, text=True, timeout=600
    )
    print(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in lines if line.startswith(("FAIL", "SKIP"))]
    passed = [line for line in lines if line.startswith("PASS")]
    assert len(passed) >= 38  # 20 schedulers, 2 forward process, 6 models/tokenizers, 9 pipelines, 1 real vocab
    assert lines[-1] == f"{len(passed)} passed, 0 failed"


def test_parity_runner_reports_failures(tmp_path, fixtures_dir):
    """A corrupted case fails (exit 1) instead of passing: copy one case and change its expected output."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    case = tmp_path / "case"
    shutil.copytree(fixtures_dir / "forward_process" / "add_noise_linear", case)
    t = load_file(case / "tensors.safetensors")
    t["noisy"] = t["noisy"] + 1e-3 * torch.randn_like(t["noisy"])
    save_file(t, case / "tensors.safetensors")
    proc = subprocess.run([sys.executable, "-m", "diffusekit.parity", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"
