"""``diffusekit ema-reconstruct``: the weights of any EMA length, chosen after training (EDM2 post-hoc EMA)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusekit.cli.train_common import check_replaced_folder
from diffusekit.errors import ConfigError
from diffusekit.limits import check_float, check_int

DESCRIPTION = """\
Write an inference folder whose weights are the power-function EMA (Karras et al. 2024, EDM2, sec. 3.1) of
a training run at --sigma-rel, reconstructed after training from the run's snapshots (their appendix C.2).

The run must have been trained with ema.kind = "power": it then keeps the averages of a
few EMA lengths (ema.sigma_rels, e.g. 0.05 and 0.10) in RUN/ema_snapshots/ every ema.snapshot_every steps.
sigma_rel is the width of the averaging window (its standard deviation) as a fraction of the training length:
0.05 puts 95 % of the weight on the last 15 % of the steps, 0.10 on the last 30 %. Any value in [0.0001, 0.28]
can be reconstructed; values between the tracked ones come out best (the profile error printed says how well)."""

EPILOG = """\
examples:
  diffusekit ema-reconstruct runs/mnist --sigma-rel 0.07 --out runs/mnist/model-ema007
  diffusekit ema-reconstruct runs/mnist --sigma-rel 0.12 --step 4000 --out ema012-at-4000
  diffusekit sample runs/mnist/model-ema007 --n 64 --out grid.png"""


# what an inference folder of a pixel-space model holds: an existing --out with anything else is not replaced
MODEL_ENTRIES = frozenset({"model_index.json", "scheduler", "unet"})


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ema-reconstruct",
        help="weights of any EMA length from a run's power-EMA snapshots",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="training run folder (trained with ema.kind = 'power')")
    p.add_argument("--sigma-rel", type=float, required=True, metavar="S",
                   help="relative EMA length in [0.0001, 0.28] (EDM2's sigma_rel), e.g. 0.05-0.15")  # fmt: skip
    p.add_argument("--step", type=int, metavar="N",
                   help="reconstruct the average as of optimizer step N (default: the newest snapshot's)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="FOLDER",
                   help="inference folder to write; an existing one is replaced atomically, but only when it holds "
                        "nothing but a model folder's model_index.json, scheduler/ and unet/ (never RUN "
                        "itself)")  # fmt: skip
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from diffusekit.training.power_ema import SIGMA_REL_MAX, SIGMA_REL_MIN, SNAPSHOT_DIR, list_snapshots
    from diffusekit.training.power_ema_export import export_reconstruction

    sigma_rel = check_float("--sigma-rel", args.sigma_rel, SIGMA_REL_MIN, SIGMA_REL_MAX)
    step = None if args.step is None else check_int("--step", args.step, 1, 2**62)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN {run_dir} is not a folder")
    out = Path(args.out)
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ConfigError(f"--out {out} is the run folder RUN or holds it, and would be replaced by the model; "
                          f"choose a new folder, e.g. --out {run_dir / 'model-ema'}")  # fmt: skip
    check_replaced_folder(out, MODEL_ENTRIES, f"--out {out}", "--out")
    snapshots = list_snapshots(run_dir / SNAPSHOT_DIR) if (run_dir / SNAPSHOT_DIR).is_dir() else []
    if not snapshots:
        raise ConfigError(f"RUN {run_dir} has no power-EMA snapshots in {SNAPSHOT_DIR}/: give the folder of a run "
                          "trained with 'diffusekit train --ema-kind power' (ema.kind = 'power' in a config "
                          "file)")  # fmt: skip
    if step is not None and step < snapshots[0].step:
        raise ConfigError(f"--step {step} is before the first snapshot (step {snapshots[0].step}); "
                          f"allowed: {snapshots[0].step} or later")  # fmt: skip
    report = export_reconstruction(snapshots, sigma_rel, out, step=step)
    print(f"wrote {report.folder}: EMA sigma_rel {sigma_rel:g} at step {report.step} from {report.used} snapshot "
          f"averages (profile error {100 * report.error:.2f} %)")  # fmt: skip
    return 0
