"""Concurrent writers: many processes write PNGs into one folder at once; none may overwrite or corrupt another's.

Two modes, both run by default:

* ``writer``: ``--processes`` processes each write ``--images`` PNGs through ``PngWriter`` (the writer of
  ``diffusekit txt2img``) as fast as they can, all starting at the same moment: the worst contention for
  file names.
* ``cli``: ``--cli-processes`` real ``diffusekit txt2img`` runs on the tiny fixture pipeline, ``--cli-images``
  images each, into the same folder.

Checks: every written path is distinct and exists, the number of files equals the number of writes, every
PNG decodes completely and its pixels and metadata are the ones its writer made, and no temporary file is
left.

    python stress/concurrent_writers.py --report /tmp/concurrent.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_SD = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


def _writer(args: tuple[str, int, int, float]) -> list[str]:
    """Process ``who``: write ``n`` PNGs whose pixels and metadata encode (who, i)."""
    import numpy as np
    from PIL import Image

    from diffusekit.io.png import PngWriter

    folder, who, n, start_at = args
    writer = PngWriter(folder)
    while time.time() < start_at:  # start together
        time.sleep(0.0005)
    written = []
    for i in range(n):
        pixels = np.full((16, 16, 3), (who % 256, i % 256, (who * 7 + i) % 256), dtype=np.uint8)
        path = writer.write(Image.fromarray(pixels), seed=who * 100_000 + i,
                            text={"diffusekit": json.dumps({"who": who, "i": i})})  # fmt: skip
        written.append(str(path))
    return written


def check_folder(folder: Path, written: list[str], expect_pixels: bool) -> list[str]:
    from PIL import Image

    problems = []
    if len(set(written)) != len(written):
        problems.append(f"{len(written) - len(set(written))} paths were reported twice")
    files = sorted(p for p in folder.iterdir())
    leftovers = [p.name for p in files if p.name.startswith(".")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers[:5]}")
    pngs = [p for p in files if not p.name.startswith(".")]
    if len(pngs) != len(written):
        problems.append(f"{len(pngs)} files for {len(written)} writes")
    for p in pngs:
        try:
            with Image.open(p) as im:
                im.load()
                meta = json.loads(im.info["diffusekit"])
                pixel = im.getpixel((0, 0))
        except Exception as e:  # noqa: BLE001 - any failure to read back is a finding
            problems.append(f"{p.name}: unreadable ({type(e).__name__}: {e})")
            continue
        if expect_pixels:
            who, i = meta["who"], meta["i"]
            if pixel != (who % 256, i % 256, (who * 7 + i) % 256) or not p.name.endswith(f"-{who * 100_000 + i}.png"):
                problems.append(f"{p.name}: holds another writer's image (who={who}, i={i}, pixel={pixel})")
        elif not p.name.endswith(f"-{meta['seed']}.png"):
            problems.append(f"{p.name}: metadata seed {meta['seed']} does not match the name")
    return problems


def run_writer_mode(processes: int, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        start_at = time.time() + 2.0
        t0 = time.monotonic()
        with mp.get_context("spawn").Pool(processes) as pool:
            results = pool.map(_writer, [(str(folder), who, images, start_at) for who in range(processes)])
        seconds = time.monotonic() - t0
        written = [p for r in results for p in r]
        problems = check_folder(folder, written, expect_pixels=True)
    return {"mode": "writer", "processes": processes, "writes": len(written), "seconds": round(seconds, 1),
            "problems": problems}  # fmt: skip


def run_cli_mode(processes: int, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "diffusekit", "txt2img", "--model", str(FIXTURE_SD), "--size", "16x16",
               "--steps", "1", "--n", str(images), "--out", str(folder), "--quiet"]  # fmt: skip
        t0 = time.monotonic()
        procs = [
            subprocess.Popen([*cmd, f"writer {i}", "--seed", str(1000 * i)], stdout=subprocess.PIPE, text=True, env=env)
            for i in range(processes)
        ]
        outs = [p.communicate()[0].split() for p in procs]
        seconds = time.monotonic() - t0
        problems = [f"process {i} exited {p.returncode}" for i, p in enumerate(procs) if p.returncode]
        written = [x for out in outs for x in out]
        if len(written) != processes * images:
            problems.append(f"{len(written)} paths reported for {processes * images} images")
        problems += check_folder(folder, written, expect_pixels=False)
    return {"mode": "cli", "processes": processes, "writes": len(written), "seconds": round(seconds, 1),
            "problems": problems}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--images", type=int, default=200, help="PNGs per process (writer mode)")
    p.add_argument("--cli-processes", type=int, default=3)
    p.add_argument("--cli-images", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="repetitions of the writer mode")
    p.add_argument("--report", type=Path)
    args = p.parse_args(argv)
    results = [run_writer_mode(args.processes, args.images) for _ in range(args.rounds)]
    if FIXTURE_SD.is_dir() and args.cli_processes:
        results.append(run_cli_mode(args.cli_processes, args.cli_images))
    report = {
        "rounds": results,
        "writes": sum(r["writes"] for r in results),
        "failures": sum(len(r["problems"]) for r in results),
    }
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.write_text(text + "\n")
    print(text)
    return 0 if report["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
