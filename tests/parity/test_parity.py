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


def test_parity_runner_reports_unknown_and_broken_cases_without_crashing(tmp_path, fixtures_dir, capsys):
    """A kind with no handler and a scheduler class diffusekit lacks are SKIPs that say so; an unreadable
    meta.json is a FAIL of that case; the runner goes on to the next case."""
    import json
    import shutil

    from diffusekit.parity.__main__ import run

    (tmp_path / "a_new_kind").mkdir()
    (tmp_path / "a_new_kind" / "meta.json").write_text(json.dumps({"kind": "video_to_video"}))
    (tmp_path / "b_broken").mkdir()
    (tmp_path / "b_broken" / "meta.json").write_text("{not json")
    case = tmp_path / "c_new_scheduler"
    shutil.copytree(fixtures_dir / "schedulers" / "euler_sd_n10", case)
    cfg = json.loads((case / "scheduler_config.json").read_text())
    (case / "scheduler_config.json").write_text(json.dumps({**cfg, "_class_name": "LMSDiscreteScheduler"}))
    shutil.copytree(fixtures_dir / "forward_process" / "add_noise_linear", tmp_path / "d_good")

    assert run(tmp_path) == (1, 1, 2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("SKIP  a_new_kind  (unknown kind 'video_to_video': no handler; known: ")
    assert out[1].startswith("FAIL  b_broken  error: ValueError: meta.json cannot be read: JSONDecodeError")
    assert out[2].startswith("SKIP  c_new_scheduler  (scheduler class 'LMSDiscreteScheduler' is not implemented")
    assert out[3].startswith("PASS  d_good")
