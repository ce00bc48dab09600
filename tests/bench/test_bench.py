"""Smoke tests of the benchmark harness on tiny models: diffusekit alone always; against the reference only
when the ``bench`` extra (diffusers + transformers) is installed. Benchmarks are not tests: no timing is
asserted, only that every workload runs, outputs agree with the reference and the report is complete."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import ours, spec
from diffusekit.cli.main import main as cli
from diffusekit.networks.unet import UNET_PRESETS, UNet
from diffusekit.runtime.policy import Plan, default_dtype, native_bf16, prepare, use_native_compute

ROOT = Path(__file__).resolve().parents[2]
HAS_REFERENCE = (
    importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("transformers") is not None
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_default_dtype_follows_native_bf16():
    assert default_dtype("cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)


def test_float32_compute_matches_float32_model_and_keeps_bf16_storage():
    torch.manual_seed(0)
    ref = UNet(UNET_PRESETS["tiny"])
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    model = UNet(UNET_PRESETS["tiny"])
    model.load_state_dict(ref.state_dict())
    prepare(model, Plan(dtype=torch.bfloat16, float32_compute=True))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.inference_mode():
        want = ref.eval()(x, t)
        got = model(x.bfloat16(), t)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max() + 0.05
        use_native_compute(model)
        assert (model(x.bfloat16(), t).float() - want).abs().max() < 0.1 * want.abs().max() + 0.1


def test_channels_last_changes_layout_not_values():
    torch.manual_seed(0)
    a = UNet(UNET_PRESETS["tiny"]).eval()
    for p in a.parameters():
        p.data.normal_(0, 0.05)
    b = UNet(UNET_PRESETS["tiny"])
    b.load_state_dict(a.state_dict())
    prepare(b, Plan(dtype=torch.float32))
    assert b.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.inference_mode():
        assert torch.allclose(a(x, t), b(x, t), atol=1e-5)


def test_timing_helpers():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert len(times["a"]) == len(times["b"]) == 2
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    x = torch.rand(3, 8, 8)
    assert timing.psnr(x, x) == float("inf")
    assert 19.9 < timing.psnr(torch.zeros(4), torch.full((4,), 0.1)) < 20.1
    assert timing.peak_rss_mb() > 10
    assert timing.matmul_peak_flops(torch.float32, n=128, reps=1) > 0
    assert "ratio" in harness.table([{"workload": "W1", "ratio": 0.5}])


class _FakeSide:
    """A harness side whose output is a fixed tensor: the harness's bookkeeping without any model."""

    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value

    def weights(self, workload, s, dtype):
        return {}

    def case(self, workload, s, dtype, weights):
        from diffusekit.bench.workloads import Case

        return Case(lambda: torch.full((2, 3), self.value))


def test_harness_reports_every_side_against_the_reference():
    sides = [_FakeSide("reference", 1.0), _FakeSide("ours", 1.25), _FakeSide("engine", 0.5)]
    settings = harness.Settings(workloads=["W1"], dtypes=["float32"], tiny=True, reps=2, log=lambda m: None)
    (row,) = harness.run(sides, settings)
    assert row["ours_max_abs_diff"] == row["max_abs_diff"] == 0.25
    assert row["engine_max_abs_diff"] == 0.5 and "reference_max_abs_diff" not in row
    assert all(row[f"{n}_first_call_s"] >= 0 for n in ("reference", "ours", "engine"))  # the warm-up, apart
    assert row["runs"] == "2/2/2" and row["ratio"] == row["ours_s"] / row["reference_s"]


def test_tiny_workloads_run_alone():
    for name in ("W1", "W2", "W3", "W4", "W7", "W8"):
        case = ours(name, spec(name, tiny=True), torch.float32)
        out = case.run()
        assert torch.isfinite(out).all(), name


def test_pixel_sampling_workloads_are_seeded_images():
    """W7/W8 give one image in [0, 1] of the U-Net's size, the same at every call (the harness compares the
    sides' first outputs and times later calls of the same work), and DDIM and DDPM differ."""
    images = {}
    for name in ("W7", "W8"):
        s = spec(name, tiny=True)
        case = ours(name, s, torch.float32)
        a, b = case.run(), case.run()
        assert a.shape == (1, 3, s.size, s.size) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.01, name
        assert torch.equal(a, b), name
        images[name] = a
    assert (images["W7"] - images["W8"]).abs().max() > 0.05


def test_cli_bench_without_reference(tmp_path, capsys, fixtures_dir):
    out = tmp_path / "bench.json"
    pipeline = fixtures_dir / "pipelines" / "stable_diffusion"
    argv = ["bench", "--tiny", "--reps", "1", "--workloads", "W1", "W6", "--dtypes", "float32",
            "--pipeline", str(pipeline), "--json", str(out), "--allow-busy"]  # fmt: skip
    assert cli(argv) == 0
    report = json.loads(out.read_text())
    assert [r["workload"] for r in report["rows"]] == ["W1", "W6"]
    assert all(r["ours_s"] > 0 for r in report["rows"])
    assert "ours s" in capsys.readouterr().out


def test_library_never_imports_the_reference():
    code = "import sys, diffusekit.cli.main, diffusekit.cli.bench, diffusekit.pipelines.text_to_image; " \
           "print(any(m.split('.')[0] in ('diffusers', 'transformers') for m in sys.modules))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    for path in (ROOT / "src" / "diffusekit").rglob("*.py"):
        text = path.read_text()
        assert "import diffusers" not in text and "from diffusers" not in text, path
        assert "import transformers" not in text and "from transformers" not in text, path


@pytest.mark.skipif(not HAS_REFERENCE, reason="the reference (bench extra) is not installed")
def test_compare_tiny_against_reference(tmp_path, fixtures_dir):
    out = tmp_path / "compare.json"
    pipeline = fixtures_dir / "pipelines" / "stable_diffusion"
    # tiny models: the reference runs in-process in every dtype (--reference-limit-seconds 0)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--tiny", "--reps", "1",
           "--workloads", "W1", "W2", "W3", "W4", "W6", "W7", "W8", "--pipeline", str(pipeline), "--json", str(out),
           "--reference-limit-seconds", "0", "--allow-busy"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["workload"], r["dtype"]): r for r in report["rows"]}
    for w in ("W1", "W2", "W3", "W4", "W7", "W8"):  # W8: the same generator draws x_T and DDPM's step noise
        assert rows[(w, "float32")]["max_abs_diff"] < 1e-4, w  # same weights, same math
        assert rows[(w, "bfloat16")]["max_abs_diff"] < 0.1, w
    assert report["W3_flops"]["flops_per_forward"] > 0
    assert set(report["psnr_bf16_vs_fp32"]) >= {"W6_ours", "W6_reference"}
    assert "ratio" in proc.stdout


def test_default_report_paths_are_new_files(tmp_path):
    """The benchmark scripts' default report is a new, time-stamped file: a run never replaces a committed one."""
    path = harness.stamped_path(tmp_path, "compare")
    assert path.parent == tmp_path and path.name.startswith("compare-20") and path.suffix == ".json"
    assert not path.exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--reps", "-1", "--reps must be an integer in [0, 1000]"),
     ("--budget-seconds", "nan", "--budget-seconds must be a finite number"),
     ("--json", None, "is a folder")],
)
def test_cli_bench_refuses_bad_options_before_running(tmp_path, capsys, monkeypatch, option, value, message):
    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("ran the workloads"))
    argv = ["bench", "--tiny", "--workloads", "W1", option, str(tmp_path) if value is None else value]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
