"""Controlling a training run: sizes bounded before anything is allocated, an unwritable run folder, Ctrl-C,
resuming with nothing left to train, pruning after a kill, the loss window across a resume, --help."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli.main import build_parser, main
from diffusekit.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from diffusekit.training.config import TrainConfig
from diffusekit.training.data import ArrayDataset
from diffusekit.training.monitor import read_metrics
from diffusekit.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[2] / "src" / "diffusekit" / "training"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    return tmp_path / "d.npz"


def _args(tmp_path, *extra: str) -> list[str]:
    return ["train", "--data", str(_npz(tmp_path)), "--preset", "test-tiny", "--batch-size", "4", "--output-dir",
            str(tmp_path / "run"), "--no-progress", "--no-tensorboard", *extra]  # fmt: skip


def _error(capsys) -> str:
    """The error line (notes may come before it): one line, no traceback."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("diffusekit train: error: ") and "Traceback" not in err, err
    return last


# ----------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resolution-px", "100000", r"--resolution-px must be an integer in \[1, 4096\], got 100000"),
        ("--batch-size", "100000000", r"--batch-size must be an integer in \[1, 1048576\], got 100000000"),
        ("--seed", str(2**70), r"--seed must be an integer in \[0, 9223372036854775807\], got 1180591620717411303424"),
        ("--steps", "0", r"--steps must be an integer in \[1, 1000000000\]"),
        ("--max-minutes", "0", r"--max-minutes must be a finite number in \(0.0, inf\], got 0.0"),
        ("--grad-accum-steps", "100000000", r"--grad-accum-steps must be an integer in \[1, 65536\]"),
        ("--num-workers", "100000", r"--num-workers must be an integer in \[0, 256\]"),
        ("--cpu-threads", "0", r"--cpu-threads must be an integer in \[1, \d+\]"),  # 4 per core
    ],
)
def test_sizes_are_bounded_before_anything_is_allocated(tmp_path, capsys, option, value, message):
    assert main(_args(tmp_path, option, value)) == 2
    assert re.search(message, _error(capsys))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_a_batch_that_cannot_fit_in_memory_is_refused_with_an_estimate(tmp_path, capsys, monkeypatch):
    import diffusekit.training.memory as memory

    monkeypatch.setattr(memory, "device_memory_bytes", lambda device: 1 << 30)  # a 1 GiB machine
    assert main(_args(tmp_path, "--batch-size", "1000000", "--steps", "1")) == 2
    err = _error(capsys)
    assert re.search(r"--batch-size=1000000 at --resolution-px=8 needs about [\d.]+ GiB on cpu", err), err
    fit = int(re.search(r"at most about (\d+) fit", err).group(1))
    assert 1000 < fit < 1000000
    assert main(_args(tmp_path, "--batch-size", str(min(fit, 4)), "--steps", "1")) == 0  # what fits trains


def test_the_activation_estimate_grows_with_the_image():
    from diffusekit.training.memory import activation_bytes
    from diffusekit.training.presets import build_unet_config

    cfg8 = build_unet_config("test-tiny", {}, channels=1, resolution=8, num_classes=None)
    a8, params = activation_bytes(cfg8, 1, 8)
    a16, _ = activation_bytes(cfg8, 1, 16)
    assert params == sum(p.numel() for p in __import__("diffusekit").networks.unet.UNet(cfg8).parameters())
    assert 3.5 < a16 / a8 <= 4.0  # activations scale with the pixels (4x), the embeddings do not


def _mount_readonly(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_read_only_output_dir_is_one_line_naming_the_option(tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _mount_readonly(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs Linux and root)")
    try:
        args = _args(tmp_path, "--steps", "1")
        args[args.index("--output-dir") + 1] = str(ro / "run")
        assert main(args) == 2
        err = _error(capsys)
        assert f"--output-dir {ro / 'run'}: cannot write files in {ro / 'run'} (Read-only file system)" in err
        args[args.index("--output-dir") + 1] = str(ro)  # a folder that exists
        assert main(args) == 2
        assert f"--output-dir {ro}: cannot write files in {ro} (Read-only file system)" in _error(capsys)
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# ----------------------------------------------------------------------------------------------- resume
def test_resume_with_nothing_left_to_train_says_so(tmp_path, capsys):
    assert main(_args(tmp_path, "--steps", "2", "--checkpoint-every-steps", "1")) == 0
    capsys.readouterr()
    assert main(_args(tmp_path, "--steps", "2", "--resume")) == 2
    err = _error(capsys)
    assert "step-00000002 is at step 2 and --steps is 2: there is nothing to train" in err
    assert "pass a --steps above 2" in err
    assert main(_args(tmp_path, "--steps", "1", "--resume")) == 2  # a target behind the checkpoint
    assert "is at step 2 and --steps is 1" in _error(capsys)


def _rehash(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_resume_of_a_run_saved_with_a_zero_time_budget(tmp_path, capsys):
    """Older versions accepted max_minutes = 0 (a run that trains nothing) and saved it in the checkpoint."""
    assert main(_args(tmp_path, "--steps", "2")) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    config = json.loads((ckpt / "config.json").read_text())
    config["train"]["run"]["max_minutes"] = 0
    (ckpt / "config.json").write_text(json.dumps(config))
    _rehash(ckpt)
    capsys.readouterr()
    assert main(_args(tmp_path, "--steps", "3", "--resume")) == 2
    assert re.search(r"--max-minutes must be a finite number in \(0.0, inf\], got 0", _error(capsys))
    assert main(_args(tmp_path, "--steps", "3", "--resume", "--max-minutes", "5")) == 0
    assert load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]).step == 3


def _tiny_trainer(run_dir: Path, steps: int, resume: str | None = None, **run) -> Trainer:
    images = np.random.default_rng(0).integers(0, 256, (32, 8, 8), dtype=np.uint8)
    config = TrainConfig().replace(
        model={"preset": "test-tiny"},
        optim={"batch_size": 4, "warmup_steps": 2},
        run={"output_dir": str(run_dir), "max_steps": steps, "progress": False, "tensorboard": False,
             "mixed_precision": "no", **run},
    )  # fmt: skip
    return Trainer(config, dataset=ArrayDataset(images), resume=resume)


def test_the_loss_logged_across_a_resume_averages_the_whole_window(tmp_path):
    """Logging every 3 steps, a checkpoint every 2: the record of step 6 averages steps 4-6 in both runs."""
    every = {"log_every": 3, "checkpoint_every": 2}
    _tiny_trainer(tmp_path / "full", 6, **every).fit()
    _tiny_trainer(tmp_path / "cut", 4, **every).fit()
    _tiny_trainer(tmp_path / "cut", 6, resume="latest", **every).fit()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in full] == [3, 6]
    assert [r["step"] for r in cut] == [3, 4, 6]  # the first run ended at step 4 and logged it
    assert cut[-1]["loss"] == full[-1]["loss"]  # same machine, same process sequence: exact


# ----------------------------------------------------------------------------------------------- pruning
def _tiny_checkpoint(root: Path, step: int, keep: int = 2) -> Path:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root, step, model=model.state_dict(), ema=model.state_dict(),
                           optimizer=opt.state_dict(), state={}, config={}, keep=keep)  # fmt: skip


def test_prune_removes_what_a_kill_during_pruning_left(tmp_path):
    for step in (1, 2, 3):
        _tiny_checkpoint(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    # a kill while deleting step 1: its folder emptied, or half emptied; and a folder renamed for deletion
    (tmp_path / "step-00000001").mkdir()
    half = tmp_path / "step-00000000"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".step-00000002.del-{int(dead.stdout)}").mkdir()
    _tiny_checkpoint(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_a_corrupt_checkpoint_newer_than_every_intact_one_is_kept(tmp_path):
    _tiny_checkpoint(tmp_path, 1)
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / "model.safetensors").write_bytes(b"x")  # for inspection: left alone
    _tiny_checkpoint(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002", "step-00000009"]


# ----------------------------------------------------------------------------------------------- Ctrl-C
def _image_folder(root: Path) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"{i}.png")


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    _image_folder(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffusekit", "train", "--data", str(tmp_path / "data"), "--preset", "test-tiny",
           "--batch-size", "4", "--num-workers", "1", "--steps", "100000", "--log-every-steps", "1",
           "--checkpoint-every-steps", "100000", "--output-dir", str(run), "--no-progress",
           "--no-tensorboard"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # its own process group, as a shell gives a job: Ctrl-C reaches the DataLoader worker too
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(run / "metrics.jsonl")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    newest = list_checkpoints(run / "checkpoints")[-1]
    step = load_checkpoint(newest).step
    assert step >= 3 and read_metrics(run / "metrics.jsonl")[-1]["step"] == step
    command = err.strip().splitlines()[-1].strip()
    assert command == f"diffusekit train --resume {shlex.quote(str(newest))}", err
    # the printed command continues the run (here with a nearer target)
    argv = [*shlex.split(command)[1:], "--steps", str(step + 1), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "diffusekit", *argv], env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(list_checkpoints(run / "checkpoints")[-1]).step == step + 1


# ----------------------------------------------------------------------------------------------- the rest
def test_help_shows_every_default():
    from diffusekit.cli.train import _FIELDS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices["train"]
    text = " ".join(parser.format_help().split())
    from diffusekit.training.latent_config import LatentConfig

    defaults = {**TrainConfig().to_dict(), "latent": dataclasses.asdict(LatentConfig())}
    for action in parser._actions:
        if action.dest in _FIELDS:
            section, name = _FIELDS[action.dest]
            value = defaults[section][name]
            assert "default" in (action.help or ""), action.option_strings
            if value is not None and not isinstance(value, bool):
                assert f"(default: {value})" in text, (action.option_strings, value)
    for option in ("--seed", "--beta-schedule", "--prediction-type"):
        assert re.search(re.escape(option) + r"[^-]*\(default: ", text), option


def test_training_writes_files_only_through_io_atomic():
    """The temp-file-and-rename rule has one implementation (diffusekit.io.atomic)."""
    for path in SRC.glob("*.py"):
        text = path.read_text()
        for pattern in ("os.fsync", "_fsync_dir", "tmp-{os.getpid()}", ".write_text(", "img.save(path"):
            assert pattern not in text, f"{path.name}: {pattern}"


def test_auto_precision_on_a_cpu_is_bf16_only_with_bf16_instructions(monkeypatch):
    """An AVX-512 CPU without AVX512-BF16 or AMX (oneDNN would emulate bf16 there) trains in float32."""
    from diffusekit.training.precision import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, want in [(False, False, None), (True, False, torch.bfloat16), (False, True, torch.bfloat16)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert resolve_precision("auto", cpu) is want
    assert resolve_precision("no", cpu) is None and resolve_precision("bf16", cpu) is torch.bfloat16
