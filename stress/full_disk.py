"""Full disk: train and generate into small tmpfs mounts until they fill up (Linux, root).

For each disk size in ``--sizes-kib``:

1. ``diffusekit train`` runs in a tmpfs of that size until a write fails. It must exit with status 2 and a
   one-line ``error:`` that names the file and says the disk is full (no traceback), leave no temporary
   file, and its newest intact checkpoint must load.
2. The run folder is copied to a roomy disk and resumed to ``--steps``; the final checkpoint must equal an
   uninterrupted run's bit for bit.
3. ``diffusekit txt2img --n 50`` writes into a tmpfs of that size: same error contract, and every PNG it
   reported must be complete.

    sudo python stress/full_disk.py --report /tmp/full-disk.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffusekit.io.weights import load_weights
from diffusekit.training.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SD = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


def train_cmd(run: Path, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "diffusekit", "train", "--preset", "test-tiny", "--limit", "64", "--batch-size", "8",
           "--num-workers", "0", "--steps", str(steps), "--checkpoint-every-steps", "4", "--keep-checkpoints", "2",
           "--log-every-steps", "1", "--seed", "11", "--cpu-threads", "1", "--device", "cpu", "--no-progress",
           "--no-tensorboard", "--output-dir", str(run)]  # fmt: skip
    return [*cmd, "--resume"] if resume else cmd


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)


class Tmpfs:
    def __init__(self, path: Path, kib: int) -> None:
        self.path, self.kib = path, kib

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.kib}k", "tmpfs", str(self.path)], check=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.path)], check=False)


def error_contract(done: subprocess.CompletedProcess, what: str) -> list[str]:
    problems = []
    if done.returncode != 2:
        problems.append(f"{what}: exit status {done.returncode}, expected 2")
    if "Traceback" in done.stderr:
        problems.append(f"{what}: a traceback instead of an error message")
    if "No space left on device" not in done.stderr:
        problems.append(f"{what}: the message does not say the disk is full: {done.stderr.strip()[-300:]!r}")
    return problems


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[600, 900, 1300, 1700, 2500])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--report", type=Path)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root to mount tmpfs", file=sys.stderr)
        return 2
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = tmp / "reference"
        done = run(train_cmd(reference, args.steps, False))
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 2
        final = reference / "checkpoints" / f"step-{args.steps:08d}"
        for kib in args.sizes_kib:
            problems: list[str] = []
            with Tmpfs(tmp / f"disk{kib}", kib) as disk:
                # 1. training fills the disk
                done = run(train_cmd(disk / "run", args.steps, False))
                stopped = done.returncode != 0
                if stopped:
                    problems += error_contract(done, "train")
                newest = latest_checkpoint(disk / "run" / "checkpoints")
                if newest is not None:
                    load_checkpoint(newest)
                problems += [f"train: temp file left: {t}" for t in temp_files(disk / "run")]
                # 2. resume on a roomy disk
                moved = tmp / f"moved{kib}"
                shutil.copytree(disk / "run", moved)
            done = run(train_cmd(moved, args.steps, True))
            if done.returncode:
                problems.append(f"resume after the full disk failed: {done.stderr.strip()[-300:]!r}")
            else:
                a = load_weights(final / "model.safetensors")
                b = load_weights(moved / "checkpoints" / final.name / "model.safetensors")
                if any(not torch.equal(a[k], b[k]) for k in a):
                    problems.append("resumed weights differ from the uninterrupted run")
            # 3. generation fills the disk
            images = 0
            if FIXTURE_SD.is_dir():
                with Tmpfs(tmp / f"gen{kib}", max(64, kib // 8)) as disk:
                    done = run([sys.executable, "-m", "diffusekit", "txt2img", "a cube", "--model", str(FIXTURE_SD),
                                "--size", "64x64", "--steps", "1", "--n", "200", "--out", str(disk / "out"),
                                "--quiet"])  # fmt: skip
                    problems += error_contract(done, "txt2img")
                    from PIL import Image

                    for line in done.stdout.split():
                        with Image.open(line) as im:
                            im.load()
                        images += 1
                    problems += [f"txt2img: temp file left: {t}" for t in temp_files(disk / "out")]
            results.append({"disk_kib": kib, "train_stopped_by_full_disk": stopped,
                            "newest_checkpoint": newest.name if newest else None, "images_before_full": images,
                            "problems": problems})  # fmt: skip
            failures += problems
    report = {"trials": len(results), "failures": len(failures), "results": results}
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text + "\n")
    print(text)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
