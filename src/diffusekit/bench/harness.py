"""The benchmark loop shared by ``diffusekit bench`` (diffusekit alone) and ``benchmarks/compare.py``
(diffusekit against a reference implementation): build each workload once per side from the same weights,
compare the outputs, time the sides interleaved, and collect rows for the table and the JSON report.

A *side* is an object with ``name``, ``weights(workload, spec, dtype) -> dict`` (the weights every side
loads: ``state`` and/or ``folder``; only the first side's are used) and
``case(workload, spec, dtype, weights) -> Case``. ``dtype=None`` means the side's default settings. A side
may also have ``runs_apart(workload, dtype_name) -> bool`` and ``time_apart(workload, dtype_name) -> (seconds
or None, limit)``: the cases it is too slow for are then timed once in a separate process with a time limit
(None: it did not finish), and the ratio becomes an upper bound.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diffusekit.bench import timing
from diffusekit.bench.workloads import TITLES, Case, Spec, spec
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_text_atomic
from diffusekit.limits import check_float, check_int
from diffusekit.runtime import autotune, fastconv
from diffusekit.runtime.autotune import cpu_model
from diffusekit.runtime.policy import cpu_flags, native_bf16

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "default": None}

COLUMNS = [
    ("workload", "workload"),
    ("dtype", "dtype"),
    ("ours_s", "ours s"),
    ("reference_s", "reference s"),
    ("ratio", "ratio"),
    ("max_abs_diff", "max abs diff"),
    ("runs", "runs"),
    ("load", "load"),
    ("note", "note"),
]


class Side(Protocol):
    name: str

    def weights(self, workload: str, s: Spec, dtype: torch.dtype | None) -> dict[str, Any]: ...

    def case(self, workload: str, s: Spec, dtype: torch.dtype | None, weights: dict[str, Any]) -> Case: ...


@dataclass
class Settings:
    workloads: Sequence[str]
    dtypes: Sequence[str]
    tiny: bool = False
    reps: int = 5  # timed rounds at most (fewer when the budget runs out)
    budget_s: float = 300.0  # per workload and dtype, warm-up included
    warmup: int = 1
    log: Callable[[str], None] = print
    skip: Callable[[str, str], str | None] = lambda workload, dtype: None  # a reason to skip, or None
    outputs: dict = field(default_factory=dict)  # (workload, dtype, side) -> first output, for PSNR
    busy_load: float = timing.BUSY_LOAD  # rows measured while other work kept the load above this are flagged
    meter: timing.LoadMeter = field(default_factory=timing.LoadMeter)


def machine() -> dict[str, Any]:
    """What the table was measured on."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_bf16_cpu": native_bf16("cpu"),
        "bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "fast_conv": fastconv.ENABLED,
        "autotune": autotune.current().mode,
        "autotune_file": str(autotune.current().path),
    }


def run(sides: Sequence[Side], settings: Settings) -> list[dict[str, Any]]:
    """Measure every (workload, dtype) of ``settings`` on every side; one row each."""
    rows = []
    for name in settings.workloads:
        s = spec(name, tiny=settings.tiny)
        for dtype_name in settings.dtypes:
            reason = settings.skip(name, dtype_name)
            if reason:
                rows.append({"workload": name, "dtype": dtype_name, "note": reason})
                continue
            settings.log(f"[{name} {dtype_name}] {TITLES[name]}: building")
            rows.append(under_load(settings, functools.partial(_measure, name, s, dtype_name, sides, settings)))
            settings.log("  " + json.dumps({k: v for k, v in rows[-1].items() if k != "times"}))
            gc.collect()
    return rows


def under_load(settings: Settings, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The row ``measure()`` returns, with the 1-minute load average before and after it (``load_before``,
    ``load_after``) and ``load``, the larger of the two readings less this process's own share
    (:class:`~diffusekit.bench.timing.LoadMeter`). A row whose ``load`` is above ``settings.busy_load`` is
    marked ``busy`` and its note says so: it was measured beside other work and is not evidence."""
    raw_before, before = settings.meter.read()
    row = measure()
    raw_after, after = settings.meter.read()
    row["load_before"], row["load_after"] = raw_before, raw_after
    if before is None or after is None:
        return row
    row["load"] = round(max(before, after), 2)
    row["busy"] = row["load"] > settings.busy_load
    if row["busy"]:
        flag = f"load {row['load']:.1f} - not evidence"
        row["note"] = f"{flag}; {row['note']}" if row.get("note") else flag
    return row


def busy_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``report`` measured on a busy machine (see :func:`under_load`)."""
    return [r for r in report.get("rows", []) if r.get("busy")]


def _measure(name: str, s: Spec, dtype_name: str, sides: Sequence[Side], settings: Settings) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    apart = [side for side in sides if getattr(side, "runs_apart", lambda w, d: False)(name, dtype_name)]
    weights = sides[0].weights(name, s, dtype)
    cases = {side.name: side.case(name, s, dtype, weights) for side in sides if side not in apart}
    if apart:  # too slow to interleave: timed alone in a separate process with a time limit
        row = _measure_cases(name, dtype_name, cases, settings)
        for side in apart:
            seconds, limit = side.time_apart(name, dtype_name)
            row["runs"] += "/1" if seconds is not None else "/0"
            if seconds is not None:
                row[f"{side.name}_s"] = seconds
                row["ratio"] = row["ours_s"] / seconds
                row["note"] = f"{side.name}: one run in a separate process"
            else:
                row["ratio"] = f"<{row['ours_s'] / limit:.3g}"
                row["note"] = f"{side.name} stopped after {limit:.0f} s (ratio is an upper bound)"
                row[f"{side.name}_s"] = f">{limit:.0f}"
        return row
    return _measure_cases(name, dtype_name, cases, settings)


def _measure_cases(name: str, dtype_name: str, cases: dict[str, Case], settings: Settings) -> dict[str, Any]:
    warm, outs = {}, {}
    for side_name, case in cases.items():  # the warm-up round; its outputs are compared
        timing.sync()
        start = time.perf_counter()
        out = case.run()
        timing.sync()
        warm[side_name] = time.perf_counter() - start
        outs[side_name] = out.detach().float().cpu()
    for side_name, out in outs.items():
        settings.outputs[(name, dtype_name, side_name)] = out
    remaining = settings.budget_s - sum(warm.values())
    if remaining < sum(warm.values()) or settings.reps == 0:
        times = {n: [t] for n, t in warm.items()}  # too slow to repeat: the warm-up run is the measurement
        note = "single run (counts its warm-up)"
    else:
        times = timing.interleaved({n: c.run for n, c in cases.items()}, reps=settings.reps, warmup=0,
                                   budget_s=remaining)  # fmt: skip
        note = None
    row: dict[str, Any] = {"workload": name, "dtype": dtype_name, "note": note}
    for n in cases:
        row[f"{n}_s"] = timing.median(times[n])
        row[f"{n}_first_call_s"] = warm[n]  # the warm-up call: one-time costs (compilation, caches) show here
        if n != "reference" and "reference" in cases:
            row[f"{n}_max_abs_diff"] = timing.max_abs_diff(outs[n], outs["reference"])
    if "ours" in cases and "reference" in cases:
        row["ratio"] = row["ours_s"] / row["reference_s"]
        row["max_abs_diff"] = row["ours_max_abs_diff"]
    row["runs"] = "/".join(str(len(times[n])) for n in cases)
    row["times"] = {n: times[n] for n in cases}
    del cases
    return row


def check_run_options(reps: Any, budget_s: Any, report: str | os.PathLike | None) -> None:
    """The options the benchmark commands share, checked before anything is built or timed: ``--reps`` (0: the
    warm-up round only), ``--budget-seconds`` and ``--json`` (a file, not a folder). ConfigErrors name the option."""
    check_int("--reps", reps, 0, 1000)
    check_float("--budget-seconds", budget_s, 0.0, 1e7, open_low=True)
    if report is not None and Path(report).is_dir():
        raise ConfigError(f"--json {report}: is a folder; give the path of the report file")


def stamped_path(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name-<UTC date and time>.json``: the default report path of the benchmark scripts, a new file per
    run, so that a run never replaces an earlier (possibly committed) report."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(folder) / f"{name}-{stamp}.json"


def write_report(path: str | os.PathLike, report: dict[str, Any], *, allow_busy: bool = False) -> None:
    """``report`` as JSON at ``path``, written atomically (folders made as needed). A report with rows
    measured on a busy machine (:func:`busy_rows`) is refused with a ConfigError naming ``--allow-busy``
    unless ``allow_busy``: such a table is not evidence and must not be committed as if it were."""
    busy = busy_rows(report)
    if busy and not allow_busy:
        where = ", ".join(" ".join(str(r[k]) for k in ("workload", "dtype", "layer") if k in r)
                          + f" at {r['load']:.1f}" for r in busy)  # fmt: skip
        raise ConfigError(
            f"{path} not written: {len(busy)} row(s) measured while other work kept the 1-minute load average "
            f"above {timing.BUSY_LOAD} ({where}); measure on an idle machine, or pass --allow-busy to write "
            "them flagged as not evidence"
        )
    write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n", what="report")


def table(rows: Sequence[dict[str, Any]]) -> str:
    return timing.format_table(rows, COLUMNS)
