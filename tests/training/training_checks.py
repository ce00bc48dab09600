"""Checks that several training tests share: a run resumed from a checkpoint equals the uninterrupted one (in
process, or after a SIGKILL of a `diffusekit` command), and the tiny super-resolution config. Imported by the
test files of this folder (pytest puts it on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from diffusekit.io.weights import load_weights
from diffusekit.training.checkpoint import list_checkpoints
from diffusekit.training.config import TrainConfig
from diffusekit.training.monitor import read_metrics


def sr_config(tmp_path: Path, task: dict, **run) -> TrainConfig:
    """A tiny super-resolution run in ``tmp_path/run``: 4 steps, a checkpoint every 2."""
    return TrainConfig().replace(
        model={"preset": "test-tiny"},
        optim={"batch_size": 4, "warmup_steps": 2},
        task={"kind": "super-resolution", **task},
        run={"output_dir": str(tmp_path / "run"), "max_steps": 4, "checkpoint_every": 2, "log_every": 1,
             "progress": False, "tensorboard": False, **run},
    )  # fmt: skip


def assert_resumed_run_equals(full, resumed, full_run: Path, resumed_run: Path) -> None:
    """The resumed trainer's weights and logged losses are exactly those of the uninterrupted one."""
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    a = [r["loss"] for r in read_metrics(full_run / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(resumed_run / "metrics.jsonl")]
    assert a == b


def runner_script(cli_module: str, trainer: str) -> str:
    """A script that runs ``diffusekit ARGS...`` in process (``cli_module``'s config_from_args, the trainer
    class ``trainer`` given as module.Class of diffusekit.training), with a hook that announces the end of step
    K (its first argument) and then hangs until the test kills the process."""
    module, cls = trainer.rsplit(".", 1)
    return textwrap.dedent(
        f"""
        import sys, time
        from diffusekit.cli.main import build_parser
        from diffusekit.cli.{cli_module} import config_from_args
        from diffusekit.training.{module} import {cls}

        kill_after = int(sys.argv[1])
        args = build_parser().parse_args(sys.argv[2:])

        def hang(trainer, step):
            if step == kill_after:
                print("READY", flush=True)
                time.sleep(600)

        {cls}(config_from_args(args), on_step_end=hang).fit()
        """
    )


def quiet_env() -> dict[str, str]:
    """One thread per process (the machine is shared) and no warnings on stderr."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def kill_and_resume(tmp_path: Path, args: list[str], runner: str, *, kill_after: int, checkpoints: list[str],
                    before_resume=None) -> tuple[Path, Path]:  # fmt: skip
    """``diffusekit ARGS --output-dir tmp_path/full`` runs to the end while the same run in ``tmp_path/cut`` is
    killed (SIGKILL) right after step ``kill_after`` and then continued with ``--resume``. ``checkpoints``: the
    checkpoint folders the killed run must have left; ``before_resume(cut)`` checks more. Returns (full, cut),
    both finished."""
    full_dir, cut = tmp_path / "full", tmp_path / "cut"
    (tmp_path / "runner.py").write_text(runner)
    full = subprocess.Popen([sys.executable, "-m", "diffusekit", *args, "--output-dir", str(full_dir)],
                            env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    victim = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(kill_after), *args, "--output-dir",
                               str(cut)], env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        line = victim.stdout.readline()
        assert line.strip() == "READY", victim.stderr.read()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        victim.kill()
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == checkpoints
    if before_resume is not None:
        before_resume(cut)
    resume = subprocess.run([sys.executable, "-m", "diffusekit", *args, "--output-dir", str(cut), "--resume"],
                            env=quiet_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 0, resume.stderr
    assert "resumed from" in resume.stderr and checkpoints[-1] in resume.stderr
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    return full_dir, cut


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoint folders hold bit-identical model, EMA and optimizer tensors."""
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_weights(a / name), load_weights(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs after resume"
