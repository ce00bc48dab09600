"""The engines a CPU user would pick instead of PyTorch eager mode, timed beside the reference (diffusers) and
diffusekit on the same random weights, in the same process, on the same machine (not a test):

* ``reference``: diffusers eager, as ``compare.py`` runs it;
* ``ours``: diffusekit eager with its runtime plan (fast convolutions, channels last, autotuned kernels);
* ``openvino``: the reference's module converted with ``openvino.convert_model`` and compiled for the CPU
  plugin (``INFERENCE_PRECISION_HINT`` = the row's dtype, latency hint, torch's thread count): what a user of
  OpenVINO's own exporters runs;
* ``compiled``: ``torch.compile`` (inductor, with ``freezing``: weights folded and prepacked, post-ops fused)
  of diffusekit's module under ``torch.no_grad``;
* ``ours_openvino``: diffusekit with ``--engine openvino`` (``pipelines.openvino_unet``): its U-Net converted
  by OpenVINO into a fresh cache folder, so the first call pays the conversion; the VAE stays on PyTorch, as
  in the pipeline, so its W4 is ``ours``'s.

Workloads W3 (SD-1.5 U-Net forward, the CFG batch of 2) and W4 (SD VAE decode to 512x512), the sizes of
``compare.py``. The steady state is the median of interleaved rounds after one warm-up call; the one-time
costs are reported apart: ``prepare_s`` (OpenVINO's conversion and compilation) and ``first_call_s`` (the
warm-up call, in which ``torch.compile`` compiles) - a command-line user pays them on every run unless they
are cached. ``<engine>_max_abs_diff`` is against the reference's output. W5 (txt2img, 20 DPM++ steps) is
estimated per engine as 20 x W3 + W4, the estimate ``compare.py`` uses where the reference cannot run W5.

    python benchmarks/engines.py --cpu-threads 2                        # float32, all four engines
    python benchmarks/engines.py --dtypes float32 bfloat16 --engines reference ours openvino
    python benchmarks/engines.py --tiny --json /tmp/engines.json        # a smoke test (seconds)

Needs the ``bench`` extra and ``pip install openvino`` (the ``openvino`` engine is skipped, with a message,
when it is missing). Writes ``results/engines-<UTC time>.json`` (or ``--json``) through
``bench.harness.write_report`` (refused when the machine was busy, as for ``compare.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import Case, Spec, inputs, ours
from diffusekit.io.unet_config import unet_to_diffusers
from diffusekit.io.vae_config import vae_to_diffusers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Ours, Reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("reference", "ours", "openvino", "compiled", "ours_openvino")
W5_STEPS = 20


class _TensorOutput(torch.nn.Module):
    """``call(module, *inputs)`` as a module whose output is a plain tensor (what a converter traces)."""

    def __init__(self, module: torch.nn.Module, call: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.call(self.module, *inputs)


def _reference_module(workload: str, s: Spec, state: dict) -> torch.nn.Module:
    """The reference's module for ``workload`` with ``state``: the U-Net's noise prediction from (x, t,
    context), or the decoder's image from z."""
    import diffusers

    if workload == "W3":
        unet = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(s.unet))
        unet.load_state_dict(state)
        return _TensorOutput(unet, lambda m, x, t, context: m(x, t, encoder_hidden_states=context).sample).eval()
    vae = diffusers.AutoencoderKL.from_config(vae_to_diffusers(s.vae))
    vae.load_state_dict(state)
    return _TensorOutput(vae, lambda m, z: m.decode(z).sample).eval()


def _example(workload: str, s: Spec) -> tuple[torch.Tensor, ...]:
    inp = inputs(workload, s, torch.float32)
    return (inp["x"], inp["t"], inp["context"]) if workload == "W3" else (inp["z"],)


class OpenVINO:
    """The reference's module through OpenVINO's converter and CPU plugin (weights converted from float32;
    the row's dtype is the plugin's inference precision)."""

    name = "openvino"

    def __init__(self) -> None:
        self.prepare_s: dict[tuple[str, str], float] = {}

    def case(self, workload: str, s: Spec, dtype: torch.dtype, weights: dict[str, Any]) -> Case:
        import openvino as ov

        start = time.perf_counter()
        example = _example(workload, s)
        module = _reference_module(workload, s, weights["state"])  # kept alive: OpenVINO may share its weights
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on the reference's shape asserts
            model = ov.convert_model(module, example_input=example)
        precision = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # fmt: skip
        compiled = ov.Core().compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        arrays = [t.numpy() for t in example]
        self.prepare_s[(workload, str(dtype).removeprefix("torch."))] = time.perf_counter() - start

        def run() -> torch.Tensor:
            request.infer(arrays)
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        return Case(run, module)


class Compiled:
    """diffusekit's module through ``torch.compile`` (inductor) with freezing, called under no_grad."""

    name = "compiled"

    def __init__(self, mode: str | None) -> None:
        self.mode = mode

    def case(self, workload: str, s: Spec, dtype: torch.dtype, weights: dict[str, Any]) -> Case:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        base = ours(workload, s, dtype, state=weights["state"]).model
        inp = inputs(workload, s, dtype)
        fn = torch.compile(base if workload == "W3" else base.decode, mode=self.mode)
        args, kwargs = ((inp["x"], inp["t"]), {"context": inp["context"]}) if workload == "W3" else ((inp["z"],), {})

        def run() -> torch.Tensor:
            with torch.no_grad():
                return fn(*args, **kwargs)

        return Case(run, base)


class OursOpenVINO:
    """diffusekit's U-Net on its OpenVINO engine (the VAE on PyTorch), converted into ``cache_dir``."""

    name = "ours_openvino"

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def case(self, workload: str, s: Spec, dtype: torch.dtype, weights: dict[str, Any]) -> Case:
        from diffusekit.pipelines.openvino_unet import use_engine

        case = ours(workload, s, dtype, state=weights["state"])
        if workload == "W3":
            use_engine(case.model, "openvino", cache_dir=self.cache_dir)
        return case


class Sides:
    """The reference first (it makes the weights), then the other engines: one harness side per engine,
    each building its case from the reference's state dict."""

    def __init__(self, engines: list[str], reference: Reference, compile_mode: str | None, workdir: Path) -> None:
        self.openvino = OpenVINO()  # kept: its conversion times go into the report
        made = {"reference": reference, "ours": Ours(), "openvino": self.openvino, "compiled": Compiled(compile_mode),
                "ours_openvino": OursOpenVINO(workdir / "openvino-cache")}  # fmt: skip
        self.sides = [made[e] for e in engines]


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def w5_estimates(rows: list[dict[str, Any]], engines: list[str]) -> list[dict[str, Any]]:
    """W5 per engine and dtype as 20 x W3 + W4 (steady state), where both rows were measured."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        by = {r["workload"]: r for r in rows if r["dtype"] == dtype}
        if "W3" not in by or "W4" not in by:
            continue
        row: dict[str, Any] = {"workload": "W5 (estimate)", "dtype": dtype}
        for e in engines:
            if f"{e}_s" in by["W3"] and f"{e}_s" in by["W4"]:
                row[f"{e}_s"] = W5_STEPS * by["W3"][f"{e}_s"] + by["W4"][f"{e}_s"]
        out.append(row)
    return out


def add_ratios(row: dict[str, Any], engines: list[str]) -> None:
    if "reference_s" not in row:
        return
    for e in engines:
        if e != "reference" and f"{e}_s" in row:
            row[f"{e}_ratio"] = row[f"{e}_s"] / row["reference_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                   help="engines to time (default all; the reference always runs: it makes the weights)")  # fmt: skip
    p.add_argument("--workloads", nargs="+", default=["W3", "W4"], choices=["W3", "W4"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5, help="timed rounds at most (default 5)")
    p.add_argument("--budget-seconds", type=float, default=400.0,
                   help="time per workload and dtype, warm-up included (default 400)")  # fmt: skip
    p.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled engine (default: torch's default)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke test)")
    p.add_argument("--cpu-threads", type=int, help="torch (and OpenVINO) threads")
    p.add_argument("--json", type=Path, default=None,
                   help="the report (default: a new file per run, "
                   "benchmarks/results/engines-<UTC time>.json)")  # fmt: skip
    p.add_argument("--allow-busy", action="store_true", help="write --json even when rows were measured busy")
    args = p.parse_args(argv)
    args.json = args.json or harness.stamped_path(ROOT / "benchmarks" / "results", "engines")
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        p.error(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    engines = ["reference"] + [e for e in args.engines if e != "reference"]
    if not openvino_available():
        for name in {"openvino", "ours_openvino"} & set(engines):
            print(f"engines.py: openvino is not installed (pip install openvino): {name} is skipped", file=sys.stderr)
            engines.remove(name)
    args.engines = engines
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    info = harness.machine()
    log(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="diffusekit-engines-") as tmp:
        sides = Sides(args.engines, Reference(Path(tmp), Path(tmp), tiny=args.tiny), args.compile_mode, Path(tmp))
        settings = harness.Settings(workloads=args.workloads, dtypes=args.dtypes, tiny=args.tiny, reps=args.reps,
                                    budget_s=args.budget_seconds, log=log)  # fmt: skip
        rows = harness.run(sides.sides, settings)
    for row in rows:
        row.pop("ratio", None), row.pop("max_abs_diff", None)  # the harness's ours/reference pair: kept per engine
        if "openvino" in args.engines:
            row["openvino_prepare_s"] = sides.openvino.prepare_s.get((row["workload"], row["dtype"]))
        add_ratios(row, args.engines)
    estimates = w5_estimates(rows, args.engines)
    for row in estimates:
        add_ratios(row, args.engines)
    columns = [("workload", "workload"), ("dtype", "dtype")]
    columns += [(f"{e}_s", f"{e} s") for e in args.engines] + [(f"{e}_ratio", f"{e}/ref") for e in args.engines[1:]]
    columns += [("load", "load"), ("note", "note")]
    print(timing.format_table(rows + estimates, columns))
    print(timing.format_table(rows, [("workload", "workload"), ("dtype", "dtype")]
                              + [(f"{e}_first_call_s", f"{e} 1st call s") for e in args.engines]
                              + [("openvino_prepare_s", "openvino convert+compile s")]
                              + [(f"{e}_max_abs_diff", f"{e} max|diff|") for e in args.engines[1:]]))  # fmt: skip
    report = {"machine": info, "engines": args.engines, "rows": rows, "w5_estimates": estimates,
              "compile_mode": args.compile_mode}  # fmt: skip
    harness.write_report(args.json, report, allow_busy=args.allow_busy)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
