"""``diffusekit bench``: time the workloads W1-W8 on this machine.

Without ``--compare`` only diffusekit runs (fresh random weights; no extra packages). With ``--compare``
the same workloads also run on the reference implementation (diffusers + transformers, installed by the
``bench`` extra) from identical weights, interleaved, and the table shows the time ratio ours/reference.
The comparison lives in ``benchmarks/compare.py`` of a source checkout; this command runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import (
    DEFAULT,
    QUICK,
    TITLES,
    WORKLOADS,
    Case,
    Spec,
    ours,
    save_random_pipeline,
    spec,
)
from diffusekit.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[3]
COMPARE = CHECKOUT / "benchmarks" / "compare.py"
FIXTURE_PIPELINE = CHECKOUT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


DESCRIPTION = """\
Time diffusekit's benchmark workloads on this machine and print a table of median times.

Without --compare only diffusekit runs, with fresh random weights and no extra packages. With --compare
the same workloads also run on the reference implementation (diffusers and transformers, installed by
pip install 'diffusekit[bench]') from identical weights, interleaved, and the table shows the time ratio
ours / reference. --compare needs a source checkout (it runs benchmarks/compare.py).

workloads:
""" + "\n".join(f"  {name}  {text}" for name, text in TITLES.items())

EPILOG = """\
examples:
  diffusekit bench --tiny                      # seconds: checks that everything runs
  diffusekit bench --quick --dtypes float32    # W1, W2, W6 in float32, a few minutes
  diffusekit bench --workloads W3 W4 --reps 3 --json w34.json
  diffusekit bench --compare --quick           # side by side with the reference implementation"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time diffusekit's workloads W1-W8 (and compare with the reference implementation)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--compare", action="store_true", help="also run the reference (needs the bench extra)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (a few minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (seconds; checks the harness)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, metavar="W",
                   help=f"some of {', '.join(WORKLOADS)} (default: all but W8, which runs only when named: 1000 "
                   "sampler steps, ~50 minutes per side on 2 CPU cores)")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"],
                   metavar="DTYPE", help="float32, bfloat16, float16 (default: float32 bfloat16)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, metavar="N", help="timed runs per workload at most (default 5)")
    p.add_argument("--budget-seconds", type=float, default=240.0, metavar="S",
                   help="time per workload and dtype, warm-up included (default 240)")  # fmt: skip
    p.add_argument("--pipeline", type=Path, default=FIXTURE_PIPELINE, metavar="DIR",
                   help="the tiny reference SD folder: W6's model and W5's tokenizer")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON to this file")
    p.add_argument("--allow-busy", action="store_true",
                   help="write --json even with rows measured while other work kept the 1-minute load average "
                        f"above {timing.BUSY_LOAD} (flagged 'not evidence' in the table; default: refuse)")  # fmt: skip
    p.set_defaults(run=run)


class OursAlone:
    """diffusekit with its own fresh weights (no reference installed)."""

    name = "ours"

    def __init__(self, pipeline: Path, workdir: Path) -> None:
        self.pipeline, self.workdir = pipeline, workdir

    def weights(self, workload: str, s: Spec, dtype: torch.dtype | None) -> dict:
        if workload == "W5":
            return {"folder": save_random_pipeline(self.workdir / "w5", s, self.pipeline / "tokenizer")}
        if workload == "W6":
            return {"folder": self.pipeline}
        return {}

    def case(self, workload: str, s: Spec, dtype: torch.dtype | None, weights: dict) -> Case:
        return ours(workload, s, dtype, state=weights.get("state"), folder=weights.get("folder"))


def run(args: argparse.Namespace) -> int:
    harness.check_run_options(args.reps, args.budget_seconds, args.json)
    if args.compare:
        return _run_compare(args)
    workloads = list(args.workloads or (QUICK if args.quick else DEFAULT))
    if any(w in ("W5", "W6") for w in workloads) and not (args.pipeline / "model_index.json").is_file():
        raise ConfigError(f"W5/W6 need a tiny SD folder (--pipeline); {args.pipeline} is not one")
    with tempfile.TemporaryDirectory(prefix="diffusekit-bench-") as tmp:
        settings = harness.Settings(workloads=workloads, dtypes=args.dtypes, tiny=args.tiny, reps=args.reps,
                                    budget_s=args.budget_seconds)  # fmt: skip
        rows = harness.run([OursAlone(args.pipeline, Path(tmp))], settings)
    report = {"machine": harness.machine(), "rows": rows}
    print(harness.table(rows))
    if args.json:
        harness.write_report(args.json, report, allow_busy=args.allow_busy)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    if not COMPARE.is_file():
        raise ConfigError(f"--compare needs a source checkout with {COMPARE.relative_to(CHECKOUT)}")
    module_spec = importlib.util.spec_from_file_location("diffusekit_benchmarks_compare", COMPARE)
    compare = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(compare)
    argv = ["--dtypes", *args.dtypes, "--reps", str(args.reps), "--budget-seconds", str(args.budget_seconds),
            "--pipeline", str(args.pipeline)]  # fmt: skip
    argv += ["--quick"] * args.quick + ["--tiny"] * args.tiny
    argv += ["--workloads", *args.workloads] if args.workloads else []
    argv += ["--json", str(args.json)] if args.json else []
    argv += ["--allow-busy"] * args.allow_busy
    return int(compare.main(argv))


__all__ = ["add_parser", "run", "spec"]
