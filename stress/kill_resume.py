"""Kill/resume stress: SIGKILL ``diffusekit train`` at random moments and resume it, again and again.

1. A reference run trains ``--steps`` steps without interruption.
2. The same run is started with ``--resume`` and SIGKILLed, ``--trials`` times, in turn: at a random moment
   of the process's life (start-up, training, logging, checkpointing), the moment a checkpoint's temporary
   folder appears (in the middle of writing it; inotify), or the moment a checkpoint is renamed into place
   (while older ones are pruned) -- the latter two after letting 0-3 checkpoints pass, so the run moves on.
   After each kill the newest intact checkpoint must load, and the next run must resume from exactly that
   one (its header names it).
3. A last run finishes the job. Its final checkpoint (model, EMA, optimizer, RNG state, step and data
   position) and its exported EMA model must equal the reference run's bit for bit, and no temporary file
   or folder may be left anywhere in the run folder.

    python stress/kill_resume.py --trials 24 --work /tmp/kill-resume --report /tmp/kill-resume/report.json

Exit status 0 when every check passed. The figures (trials, kills mid-checkpoint, failures) are printed as
JSON and written to ``--report``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusekit.errors import DiffusekitError
from diffusekit.io.weights import load_weights
from diffusekit.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

MODES = ("random", "mid_checkpoint", "random", "mid_checkpoint", "after_checkpoint")
TEMP_PATTERNS = (re.compile(r"^\.tmp-"), re.compile(r"\.tmp(-\d+)?$"), re.compile(r"^\.old-"), re.compile(r"\.tmp-"))


class DirWatch:
    """Names created in (or moved into) a folder, as they happen (Linux inotify through libc)."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, bytes(folder), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify is not available")

    def names(self, timeout: float) -> list[str]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data, out, i = os.read(self.fd, 65536), [], 0
        while i + 16 <= len(data):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, i)
            out.append(data[i + 16 : i + 16 + length].rstrip(b"\0").decode())
            i += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def train_command(run_dir: Path, steps: int, checkpoint_every: int, resume: bool) -> list[str]:
    cmd = [
        sys.executable, "-m", "diffusekit", "train",
        "--preset", "test-tiny", "--limit", "64", "--batch-size", "8", "--num-workers", "0",
        "--steps", str(steps), "--checkpoint-every-steps", str(checkpoint_every), "--keep-checkpoints", "2",
        "--log-every-steps", "2", "--warmup-steps", "5", "--seed", "7", "--cpu-threads", "1",
        "--device", "cpu", "--no-progress", "--no-tensorboard", "--output-dir", str(run_dir),
    ]  # fmt: skip
    return [*cmd, "--resume"] if resume else cmd


def leftover_temp_files(run_dir: Path) -> list[str]:
    found = []
    for p in run_dir.rglob("*"):
        if any(t.search(p.name) for t in TEMP_PATTERNS):
            found.append(str(p.relative_to(run_dir)))
    return sorted(found)


def state_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, keyed by file and name."""
    out = {}
    for name in ("model", "ema", "optimizer", "rng"):
        for k, v in load_weights(checkpoint / f"{name}.safetensors").items():
            out[f"{name}/{k}"] = v
    return out


def compare_runs(ref: Path, run: Path, steps: int) -> list[str]:
    """Differences between two finished runs (empty: bit-identical)."""
    problems = []
    a, b = load_checkpoint(ref / "checkpoints" / f"step-{steps:08d}"), None
    try:
        b = load_checkpoint(run / "checkpoints" / f"step-{steps:08d}")
    except DiffusekitError as e:
        return [f"final checkpoint missing or unreadable: {e}"]
    for key in ("data_position",):
        if a.state.get(key) != b.state.get(key):
            problems.append(f"state.{key}: {a.state.get(key)} != {b.state.get(key)}")
    if a.rng_scalars != b.rng_scalars:
        problems.append("RNG scalars differ")
    ta, tb = state_tensors(a.path), state_tensors(b.path)
    if set(ta) != set(tb):
        problems.append(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    for k in sorted(set(ta) & set(tb)):
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            problems.append(f"{k} differs")
    ea = load_weights(ref / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    eb = load_weights(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    if set(ea) != set(eb) or any(not torch.equal(ea[k], eb[k]) for k in ea):
        problems.append("exported EMA model differs")
    return problems


def run_to_end(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    with open(log, "ab") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=child_env())


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=24, help="kills (>= 20 for the issue's figure)")
    p.add_argument("--steps", type=int, default=240, help="training steps of the whole run")
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--work", type=Path, required=True, help="work folder (emptied first)")
    p.add_argument("--report", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--timeout-s", type=float, default=600.0, help="limit for one process")
    p.add_argument("--train-window-s", type=float, default=2.0, help="random kills: seconds after start-up")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    ref_dir, run_dir, log = args.work / "reference", args.work / "killed", args.work / "log.txt"

    t0 = time.monotonic()
    ref_log = args.work / "reference.log"
    with open(ref_log, "wb") as out:  # timed: start-up (until the header is printed), then the whole run
        proc = subprocess.Popen(train_command(ref_dir, args.steps, args.checkpoint_every, False),
                                stdout=out, stderr=subprocess.STDOUT, env=child_env())  # fmt: skip
        startup_s = None
        while proc.poll() is None:
            if startup_s is None and "run folder" in ref_log.read_text(errors="replace"):
                startup_s = time.monotonic() - t0
            time.sleep(0.01)
    if proc.returncode != 0:
        print(f"reference run failed (exit {proc.returncode}); see {ref_log}", file=sys.stderr)
        return 2
    ref_seconds = time.monotonic() - t0
    startup_s = startup_s or ref_seconds / 2

    failures: list[str] = []
    kills = {"random": 0, "mid_checkpoint": 0, "after_checkpoint": 0, "mid_checkpoint_confirmed": 0}
    resumes, finished_early = 0, 0
    trial_log = []
    trial = 0
    while trial < args.trials:
        expected = latest_checkpoint(run_dir / "checkpoints")
        mode = MODES[trial % len(MODES)]
        skip = rng.randint(0, 3)  # checkpoint writes to let pass first, so that the run moves on
        out_path = args.work / f"trial-{trial:03d}.log"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                train_command(run_dir, args.steps, args.checkpoint_every, True),
                stdout=out, stderr=subprocess.STDOUT, env=child_env(),
            )  # fmt: skip
            killed_mid_write = False
            ckpt_root = run_dir / "checkpoints"
            ckpt_root.mkdir(parents=True, exist_ok=True)
            watch = DirWatch(ckpt_root)
            # random moments: anywhere in start-up or the first seconds of training (each run then makes a
            # little progress, so that all the kills fit in one run of --steps)
            life = rng.uniform(0.0, startup_s + args.train_window_s)
            deadline = time.monotonic() + (life if mode == "random" else args.timeout_s)
            seen = 0
            while proc.poll() is None and time.monotonic() < deadline:
                created = watch.names(0.01)
                if mode == "mid_checkpoint":  # the moment a checkpoint's temporary folder is created
                    seen += sum(n.startswith(".tmp-step-") for n in created)
                elif mode == "after_checkpoint":  # the moment it is renamed into place (pruning follows)
                    seen += sum(n.startswith("step-") for n in created)
                if seen > skip:
                    time.sleep(rng.uniform(0.0, 0.005))  # somewhere inside the write / the pruning
                    break
            watch.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                # a temporary folder the killed process left behind proves the kill hit the write
                killed_mid_write = any(ckpt_root.glob(f".tmp-step-*-{proc.pid}"))
                kills[mode] += 1
                kills["mid_checkpoint_confirmed"] += killed_mid_write
                status = "killed"
            else:
                status = f"exited {proc.returncode}"
        text = out_path.read_text(errors="replace")
        if expected is not None and "run folder" in text:
            resumes += 1
            if f"(resumed from {expected})" not in text:
                failures.append(f"trial {trial}: did not resume from the last complete checkpoint {expected}")
        if status.startswith("exited"):
            if proc.returncode != 0:
                failures.append(f"trial {trial}: the resumed run failed on its own ({status}); see {out_path}")
                break
            finished_early += 1  # reached --steps before the kill: nothing left to kill
            break
        newest = latest_checkpoint(ckpt_root)
        if newest is not None:
            try:
                load_checkpoint(newest)
            except DiffusekitError as e:
                failures.append(f"trial {trial}: newest intact checkpoint does not load: {e}")
        trial_log.append(
            {"trial": trial, "mode": mode, "mid_write": killed_mid_write,
             "latest_after": newest.name if newest else None,
             "checkpoints": [c.name for c in list_checkpoints(ckpt_root)]}
        )  # fmt: skip
        trial += 1

    if not failures:
        final = run_to_end(train_command(run_dir, args.steps, args.checkpoint_every, True), log, args.timeout_s)
        if final.returncode != 0:
            failures.append(f"the final resumed run failed (exit {final.returncode}); see {log}")
        resumes += 1
    if not failures:
        failures += compare_runs(ref_dir, run_dir, args.steps)
    leftovers = leftover_temp_files(run_dir)
    if leftovers:
        failures.append(f"temporary files left behind: {leftovers[:10]}")

    report = {
        "trials": trial,
        "kills": kills["random"] + kills["mid_checkpoint"] + kills["after_checkpoint"],
        "kills_at_random_moments": kills["random"],
        "kills_just_after_a_checkpoint_was_renamed_into_place": kills["after_checkpoint"],
        "kills_while_a_checkpoint_was_written": kills["mid_checkpoint_confirmed"],  # its temp folder was left
        "kills_triggered_by_a_checkpoint_write": kills["mid_checkpoint"],
        "resumes": resumes,
        "finished_before_the_last_kill": finished_early,
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "reference_run_seconds": round(ref_seconds, 1),
        "startup_seconds": round(startup_s, 1),
        "final_weights_bit_identical": not any("differs" in f or "final" in f for f in failures),
        "temporary_files_left": leftovers,
        "failures": failures,
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "trial_log": trial_log,
    }
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "trial_log"}, indent=2))
    if trial < args.trials:
        print(f"only {trial} of {args.trials} kills happened: raise --steps", file=sys.stderr)
    return 0 if not failures and trial >= args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
