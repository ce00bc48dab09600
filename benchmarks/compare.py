"""diffusekit against the reference implementation (diffusers + transformers, the ``bench`` extra), same
weights, same process, same machine: workloads W1-W8 (benchmarks/README.md) in float32 and bfloat16, W5 with each
side's default settings, peak memory of W5 per side (separate processes), FLOP/s of W3 against the measured
matrix-multiply peak, and PSNR of bfloat16 against float32 images (W5, W6).

    python benchmarks/compare.py [--quick] [--json PATH]      # or: diffusekit bench --compare [--quick]

The reference builds every model with its own random initialisation and saves it; diffusekit loads those
weights (W1-W4: the state dict, whose names ours match; W5: the saved pipeline folder; W6: the tiny reference
pipeline of the fixtures). Only this file imports the reference packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffusekit.bench import harness, timing
from diffusekit.bench.workloads import (
    DDPM_SCHEDULER,
    DEFAULT,
    PIXEL_SAMPLERS,
    QUICK,
    TITLES,
    WORKLOADS,
    Case,
    Spec,
    inputs,
    noise_generator,
    ours,
    spec,
)
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_bytes_atomic
from diffusekit.io.text_encoder_config import text_encoder_to_diffusers
from diffusekit.io.unet_config import unet_to_diffusers
from diffusekit.io.vae_config import vae_to_diffusers
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS
from diffusekit.networks.unet import UNet
from diffusekit.runtime import autotune
from diffusekit.runtime.policy import default_dtype, native_bf16

ROOT = Path(__file__).resolve().parents[1]
# W7/W8 at full size: with random weights the clipped-x0 sampler is chaotic, and float rounding grows to whole grey
# levels over the steps (measured: DDIM 1 step 6e-8, 10 steps 1e-3, 20 steps 0.09 between the sides, and 0.08
# between two runs of ours whose x_T differ by 1e-6); agreement is checked on the tiny models (4e-6 after 3 steps)
CHAOTIC_SAMPLING = "max abs diff: random weights make the sampler chaotic (benchmarks/README.md)"
FIXTURE_PIPELINE = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion"


def reference_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the two sides --------------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def weights(self, workload: str, s: Spec, dtype: torch.dtype | None) -> dict[str, Any]:
        raise NotImplementedError  # weights always come from the reference side here

    def case(self, workload: str, s: Spec, dtype: torch.dtype | None, weights: dict[str, Any]) -> Case:
        return ours(workload, s, dtype, state=weights.get("state"), folder=weights.get("folder"), device=self.device)


class Reference:
    """diffusers/transformers; builds the random weights that both sides load."""

    name = "reference"

    def __init__(self, pipeline: Path, workdir: Path, device: str = "cpu", *, apart_s: float = 0, tiny=False) -> None:
        self.pipeline, self.workdir, self.device = pipeline, workdir, device
        self.apart_s, self.tiny = apart_s, tiny
        self._folders: dict[str, Path] = {}

    def runs_apart(self, workload: str, dtype: str) -> bool:
        """Half precision on a CPU without native bfloat16 runs emulated kernels, minutes to hours per call:
        such cases run once in a separate process with a time limit (``--reference-limit-seconds``)."""
        slow = self.device == "cpu" and dtype in ("bfloat16", "float16") and not native_bf16("cpu")
        return bool(self.apart_s) and slow and workload != "W5"

    def time_apart(self, workload: str, dtype: str) -> tuple[float | None, float]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-case", workload, "--side", "reference",
               "--dtype", dtype, "--device", self.device, "--pipeline", str(self.pipeline)]  # fmt: skip
        cmd += ["--tiny"] if self.tiny else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.apart_s)
        except subprocess.TimeoutExpired:
            return None, self.apart_s
        if proc.returncode != 0:
            raise RuntimeError(f"reference {workload} {dtype} failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"], self.apart_s

    def weights(self, workload: str, s: Spec, dtype: torch.dtype | None) -> dict[str, Any]:
        import diffusers

        torch.manual_seed(0)
        if workload in ("W1", "W2", *PIXEL_SAMPLERS):
            self._model = diffusers.UNet2DModel.from_config(unet_to_diffusers(s.unet))
        elif workload == "W3":
            self._model = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(s.unet))
        elif workload == "W4":
            self._model = diffusers.AutoencoderKL.from_config(vae_to_diffusers(s.vae))
        elif workload == "W5":
            return {"folder": self.w5_folder(s)}
        elif workload == "W6":
            return {"folder": self.w6_folder()}
        return {"state": self._model.state_dict()}

    def w5_folder(self, s: Spec) -> Path:
        key = f"{s.size}-{s.unet.channels}"
        if key not in self._folders:
            self._folders[key] = save_reference_pipeline(self.workdir / f"w5-{len(self._folders)}", s, self.pipeline)
        return self._folders[key]

    def w6_folder(self) -> Path:
        """The tiny reference pipeline with its scheduler saved as DPM-Solver++, so that both sides read the
        same sampler configuration (the fixture's is PNDM, whose timestep rule differs)."""
        import diffusers

        folder = self.workdir / "w6"
        if not folder.exists():
            shutil.copytree(self.pipeline, folder)
            config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            diffusers.DPMSolverMultistepScheduler.from_config(config).save_config(folder / "scheduler")
            index = json.loads((folder / "model_index.json").read_text())
            index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
            (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        return folder

    def case(self, workload: str, s: Spec, dtype: torch.dtype | None, weights: dict[str, Any]) -> Case:
        if workload in ("W5", "W6"):
            return reference_pipeline_case(weights["folder"], workload, s, dtype, self.device)
        if workload in PIXEL_SAMPLERS:
            return reference_pixel_case(self._take_model(dtype), workload, s, dtype)
        model = self._take_model(dtype)
        inp = {k: v.to(self.device) for k, v in inputs(workload, s, dtype).items()}
        if workload == "W2":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(inp["x"], inp["t"]).sample.float(), inp["target"].float())
                loss.backward()
                opt.step()
                return loss.detach()

            return Case(step, model)
        model.eval().requires_grad_(False)
        if workload == "W4":
            return Case(lambda: _infer(lambda: model.decode(inp["z"]).sample), model)
        extra = {"encoder_hidden_states": inp["context"]} if "context" in inp else {}
        return Case(lambda: _infer(lambda: model(inp["x"], inp["t"], **extra).sample), model)

    def _take_model(self, dtype: torch.dtype | None) -> Any:
        """The model :meth:`weights` built, moved to this side's device and ``dtype`` (and let go here)."""
        model, self._model = self._model, None
        return model.to(self.device, dtype)


def reference_pixel_case(model: Any, workload: str, s: Spec, dtype: torch.dtype | None) -> Case:
    """W7/W8 as a reference user runs them: ``DDIMPipeline`` (eta 0) or ``DDPMPipeline`` over the DDPM releases'
    scheduler configuration, the generator seeded as diffusekit's side seeds it (x_T, then DDPM's step noise)."""
    import diffusers

    model.eval().requires_grad_(False)
    ddim = PIXEL_SAMPLERS[workload][0] == "ddim"
    scheduler = (diffusers.DDIMScheduler if ddim else diffusers.DDPMScheduler).from_config(DDPM_SCHEDULER)
    pipe = (diffusers.DDIMPipeline if ddim else diffusers.DDPMPipeline)(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    options = {"eta": 0.0} if ddim else {}

    def generate() -> torch.Tensor:
        out = pipe(batch_size=1, generator=noise_generator(), num_inference_steps=s.steps, output_type="pt", **options)
        return out.images

    return Case(generate, model)


def _infer(fn):
    with torch.inference_mode():
        return fn()


def save_reference_pipeline(folder: Path, s: Spec, tokenizer_from: Path) -> Path:
    """The W5 model: a reference StableDiffusionPipeline with random weights at the sizes of ``s``, the
    tokenizer of ``tokenizer_from`` and a DPM-Solver++ scheduler with SD's noise schedule, saved."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_from / "tokenizer")
    vocab = len(tokenizer.get_vocab())
    text = TEXT_ENCODER_PRESETS["tiny" if s.unet.cross_attention_dim == 32 else "sd1"]
    text = dataclasses.replace(text, vocab_size=vocab, bos_id=vocab - 2, eos_id=vocab - 1, pad_id=vocab - 1)
    scheduler_config = json.loads((tokenizer_from / "scheduler" / "scheduler_config.json").read_text())
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_config(vae_to_diffusers(s.vae)),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_encoder_to_diffusers(text))),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(s.unet)),
        scheduler=diffusers.DPMSolverMultistepScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    shutil.copytree(tokenizer_from / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)  # vocab.json, merges
    return folder


def reference_pipeline_case(folder: Path, workload: str, s: Spec, dtype: torch.dtype | None, device: str) -> Case:
    import diffusers

    kwargs = {} if dtype is None else {"torch_dtype": dtype}  # None: the reference's defaults
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, **kwargs).to(device)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    lat = inputs(workload, s, torch.float32, latent_channels=pipe.vae.config.latent_channels, latent_factor=f)
    lat = lat["latents"].to(device, pipe.unet.dtype)

    def generate() -> torch.Tensor:
        out = pipe(s.prompt, height=s.size, width=s.size, num_inference_steps=s.steps, guidance_scale=7.5,
                   latents=lat, output_type="pt")  # fmt: skip
        return out.images

    return Case(generate, pipe.unet)


# ---- extras -------------------------------------------------------------------------------------------------
def w3_flops(s: Spec) -> int:
    """FLOPs of one W3 forward, counted on meta tensors (nothing is computed)."""
    with torch.device("meta"):
        model = UNet(s.unet)
        inp = {k: v.to("meta") for k, v in inputs("W3", s, torch.float32).items()}
    return timing.count_flops(lambda: model(inp["x"], inp["t"], context=inp["context"]))


def child_case(args: argparse.Namespace) -> int:
    """One run of one reference case in this process (the slow cases of Reference.runs_apart)."""
    with tempfile.TemporaryDirectory(prefix="diffusekit-bench-") as tmp:
        reference = Reference(args.pipeline, Path(tmp), args.device, apart_s=args.reference_limit_seconds,
                              tiny=args.tiny)  # fmt: skip
        s, dtype = spec(args.child_case, tiny=args.tiny), harness.DTYPES[args.dtype]
        case = reference.case(args.child_case, s, dtype, reference.weights(args.child_case, s, dtype))
        print(json.dumps({"seconds": timing.clock(case.run)}))
    return 0


def child_w5(args: argparse.Namespace) -> int:
    """One W5 run of one side in this (fresh) process; prints seconds and peak RSS as JSON."""
    s = dataclasses.replace(spec("W5", tiny=args.tiny), steps=args.steps)
    dtype = harness.DTYPES[args.dtype]
    if args.side == "reference":
        case = reference_pipeline_case(Path(args.folder), "W5", s, dtype, args.device)
    else:
        case = ours("W5", s, dtype, folder=args.folder, device=args.device)
    seconds = timing.clock(case.run)
    result = {"seconds": seconds, "peak_rss_mb": timing.peak_rss_mb()}
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))
    return 0


def w5_memory(folder: Path, dtypes: list[str], tiny: bool, steps: int, device: str, log) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for side in ("ours", "reference"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child-w5", "--side", side, "--dtype", dtype,
                   "--folder", str(folder), "--steps", str(steps), "--device", device]  # fmt: skip
            cmd += ["--tiny"] if tiny else []
            log(f"[W5 memory] {side} {dtype}: separate process")
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                rows.append({"side": side, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rows.append({"side": side, "dtype": dtype, **json.loads(proc.stdout.strip().splitlines()[-1])})
            log("  " + json.dumps(rows[-1]))
    return rows


# ---- main -----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (a few minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in models (a smoke test of the harness)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, metavar="W",
                   help="workloads to run (default: all but W8, which runs only when named)")  # fmt: skip
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16", "default"],
                   help="precisions to time (default: float32 bfloat16); 'default' is W5's row of each side as its "
                   "user gets it without options, the only one W5 runs when it is the only dtype given")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="timed rounds per workload at most (default 5)")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=240.0,
        help="time per workload and dtype, warm-up included; fewer rounds when exceeded (default 240)",
    )
    p.add_argument(
        "--pipeline",
        type=Path,
        default=FIXTURE_PIPELINE,
        help="the tiny reference SD folder used by W6 (and its tokenizer by W5)",
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="denoising steps of the W5 peak-memory runs (the peak does not grow with steps)",
    )
    p.add_argument("--estimate-reference-bf16-w5", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPUs without native bfloat16, estimate the reference's bfloat16 W5 from its W3 and W4 "
                   "times (20 x W3 + W4) instead of running it for hours")  # fmt: skip
    p.add_argument("--reference-limit-seconds", type=float, default=600.0,
                   help="on CPUs without native bfloat16, the reference's half-precision cases run once in a separate "
                   "process stopped after this long (0: run them in-process, interleaved, however long)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run (default cpu)")
    p.add_argument("--memory-only", action="store_true",
                   help="only W5's peak resident memory, each side in a fresh process (no timing)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None,
                   help="the report (default: a new file per run, "
                   "benchmarks/results/compare-<UTC time>.json)")  # fmt: skip
    p.add_argument("--allow-busy", action="store_true",
                   help=f"write --json even with rows measured while other work kept the 1-minute load average "
                        f"above {timing.BUSY_LOAD} (they stay flagged 'not evidence'; default: refuse)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--child-w5", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON", help="combine reports of partial runs into --json"
    )
    parser.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.json = args.json or harness.stamped_path(ROOT / "benchmarks" / "results", "compare")
    # kernel choices measured once per machine and kept, as the command-line tool keeps them: the parent's
    # warm-up rounds measure, the fresh processes of the memory rows read the file
    autotune.configure(writer=write_bytes_atomic)
    if args.child_w5:
        return child_w5(args)
    if args.child_case:
        return child_case(args)
    try:
        harness.check_run_options(args.reps, args.budget_seconds, args.json)
        if args.merge:
            return merge(args.merge, args.json, allow_busy=args.allow_busy)
        return compare(args)
    except ConfigError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2


def compare(args: argparse.Namespace) -> int:
    if not reference_available():
        print("the comparison needs the reference: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    workloads = list(args.workloads or (QUICK if args.quick else DEFAULT))
    info = harness.machine()
    log(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="diffusekit-bench-") as tmp:
        reference = Reference(args.pipeline, Path(tmp), args.device, apart_s=args.reference_limit_seconds,
                              tiny=args.tiny)  # fmt: skip
        measured: dict[tuple[str, str], dict] = {}
        if args.memory_only:  # W5's peak resident memory per side, each in a fresh process; no timing
            folder = reference.w5_folder(spec("W5", tiny=args.tiny))
            mem_dtypes = ["float32"] if default_dtype(args.device) == torch.float32 else ["float32", "default"]
            peak = w5_memory(folder, mem_dtypes, args.tiny, args.memory_steps, args.device, log)
            harness.write_report(args.json, {"machine": info, "W5_peak_rss": peak}, allow_busy=args.allow_busy)
            for r in peak:
                print(json.dumps(r))
            print(f"\nJSON: {args.json}")
            return 0

        def skip(workload: str, dtype: str) -> str | None:
            if (
                (workload, dtype) == ("W5", "bfloat16")
                and args.estimate_reference_bf16_w5
                and args.device == "cpu"
                and not info["native_bf16_cpu"]
            ):
                return "estimate"  # handled below
            return None

        dtypes = [d for d in args.dtypes if d != "default"]
        if not dtypes and any(w != "W5" for w in workloads):
            raise ConfigError("--dtypes default alone applies to W5 only: add --workloads W5 or another dtype")
        # each side's defaults: ours picks bfloat16 only where the CPU computes it natively; the reference's
        # pipeline loads float32. When both resolve to float32, the float32 row is the defaults row.
        defaults_are_fp32 = default_dtype(args.device) == torch.float32 and "float32" in dtypes
        dtypes_w5 = dtypes + ([] if defaults_are_fp32 else ["default"])  # --dtypes default alone: that row only
        settings = harness.Settings(workloads=[w for w in workloads if w != "W5"], dtypes=dtypes, tiny=args.tiny,
                                    reps=args.reps, budget_s=args.budget_seconds, log=log)  # fmt: skip
        rows = harness.run([reference, Ours(args.device)], settings)
        if "W5" in workloads:
            settings.workloads, settings.dtypes, settings.skip = ["W5"], dtypes_w5, skip
            settings.reps = 1
            rows += harness.run([reference, Ours(args.device)], settings)
        for r in rows:  # the full-size pixel samplers' outputs are not a check of the two sides' agreement
            if r["workload"] in PIXEL_SAMPLERS and not args.tiny:
                r["note"] = "; ".join(filter(None, [r.get("note"), CHAOTIC_SAMPLING]))
        if "W5" in workloads and defaults_are_fp32:
            row = next(r for r in rows if (r["workload"], r["dtype"]) == ("W5", "float32"))
            same = "defaults are float32 on both sides here: same runs"
            flag = f"load {row['load']:.1f} - not evidence; " if row.get("busy") else ""
            rows.append({**row, "dtype": "default", "note": flag + same})
        for r in rows:
            measured[(r["workload"], r["dtype"])] = r
        extras: dict[str, Any] = {}
        if (
            "W5" in workloads
            and ("W5", "bfloat16") in measured
            and measured[("W5", "bfloat16")].get("note") == "estimate"
        ):
            rows[rows.index(measured[("W5", "bfloat16")])] = harness.under_load(
                settings, lambda: estimate_w5_bf16(args, reference, settings, measured, log)
            )
        if "W3" in workloads:
            extras["W3_flops"] = flops_report(spec("W3", tiny=args.tiny), measured, dtypes, args.device, log)
        extras["psnr_bf16_vs_fp32"] = psnr_report(settings.outputs)
        if "W5" in workloads:
            folder = reference.w5_folder(spec("W5", tiny=args.tiny))
            mem_dtypes = ["float32"] if defaults_are_fp32 else ["float32", "default"]
            extras["W5_peak_rss"] = w5_memory(folder, mem_dtypes, args.tiny, args.memory_steps, args.device, log)
    report = {"machine": info, "workloads": {w: TITLES[w] for w in workloads}, "rows": rows, **extras}
    print(render(report))  # first: a refused report is still seen
    harness.write_report(args.json, report, allow_busy=args.allow_busy)
    print(f"\nJSON: {args.json}")
    return 0


def estimate_w5_bf16(args, reference, settings, measured, log) -> dict[str, Any]:
    """Ours runs W5 in bfloat16 for real; the reference's time is 20 x its W3 + its W4 (bfloat16 rows)."""
    s = spec("W5", tiny=args.tiny)
    log("[W5 bfloat16] ours only; the reference is estimated from its W3 and W4 bfloat16 times")
    case = ours("W5", s, torch.bfloat16, folder=reference.w5_folder(s), device=args.device)
    t = timing.clock(lambda: settings.outputs.__setitem__(("W5", "bfloat16", "ours"), case.run().float()))
    row = {"workload": "W5", "dtype": "bfloat16", "ours_s": t, "runs": "1/0"}
    return fill_w5_estimate(row, measured, s.steps)


def fill_w5_estimate(row: dict[str, Any], measured: dict, steps: int) -> dict[str, Any]:
    """The reference's bfloat16 W5 time as ``steps`` x its W3 + its W4 (a lower bound when either was stopped)."""
    w3 = measured.get(("W3", "bfloat16"), {}).get("reference_s")
    w4 = measured.get(("W4", "bfloat16"), {}).get("reference_s")
    if w3 is None or w4 is None:
        row["note"] = "reference not run (its estimate needs the W3 and W4 bf16 rows)"
        return row
    bound = isinstance(w3, str) or isinstance(w4, str)
    seconds = steps * float(str(w3).lstrip(">")) + float(str(w4).lstrip(">"))
    row["reference_s"] = f">{seconds:.0f}" if bound else seconds
    row["ratio"] = f"<{row['ours_s'] / seconds:.3g}" if bound else row["ours_s"] / seconds
    row["note"] = f"reference estimated: {steps} x W3 + W4 (bf16 rows)" + (", a lower bound" if bound else "")
    return row


def merge(paths: list[Path], out: Path, *, allow_busy: bool = False) -> int:
    """Combine reports of partial runs (e.g. W5 run apart from W1-W4) into one, filling the W5 bfloat16 estimate."""
    reports = [json.loads(p.read_text()) for p in paths]
    report = {"machine": reports[0]["machine"], "workloads": {}, "rows": []}
    report["machine"] = {**reports[0]["machine"], "runs": [r["machine"] for r in reports]}
    for r in reports:
        report["workloads"].update(r["workloads"])
        report["rows"] += r["rows"]
        for key in ("W3_flops", "W5_peak_rss"):
            if key in r:
                report[key] = r[key]
        report.setdefault("psnr_bf16_vs_fp32", {}).update(r.get("psnr_bf16_vs_fp32", {}))
    measured = {(r["workload"], r["dtype"]): r for r in report["rows"]}
    w5 = measured.get(("W5", "bfloat16"))
    if w5 is not None and "reference_s" not in w5:
        fill_w5_estimate(w5, measured, 20)
    order = {w: i for i, w in enumerate(WORKLOADS)}
    report["rows"].sort(
        key=lambda r: (order[r["workload"]], ["float32", "bfloat16", "float16", "default"].index(r["dtype"]))
    )
    print(render(report))
    harness.write_report(out, report, allow_busy=allow_busy)
    return 0


def flops_report(s: Spec, measured, dtypes, device, log) -> dict[str, Any]:
    flops = w3_flops(s)
    out: dict[str, Any] = {"flops_per_forward": flops}
    for dtype in dtypes:
        row = measured.get(("W3", dtype), {})
        peak = timing.matmul_peak_flops(harness.DTYPES[dtype], device=device)
        peak32 = timing.matmul_peak_flops(torch.float32, device=device)
        entry = {"matmul_peak_gflops": peak / 1e9, "matmul_peak_fp32_gflops": peak32 / 1e9}
        for side in ("ours", "reference"):
            if isinstance(row.get(f"{side}_s"), float):  # not a ">limit" bound
                achieved = flops / row[f"{side}_s"]
                entry[f"{side}_gflops"] = achieved / 1e9
                entry[f"{side}_of_peak"] = achieved / peak
        out[dtype] = entry
        log(f"[W3 FLOP/s {dtype}] {entry}")
    return out


def psnr_report(outputs: dict) -> dict[str, float]:
    out = {}
    for workload in ("W5", "W6"):
        for side in ("ours", "reference"):
            a, b = outputs.get((workload, "float32", side)), outputs.get((workload, "bfloat16", side))
            if a is not None and b is not None:
                out[f"{workload}_{side}"] = timing.psnr(a, b)
    return out


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{m['date']}  {m['cpu']}  ({m['cpu_count']} CPUs, {m['threads']} threads)  torch {m['torch']}",
             harness.table(report["rows"])]  # fmt: skip
    if "W3_flops" in report:
        f = report["W3_flops"]
        lines.append(f"\nW3: {f['flops_per_forward'] / 1e9:.0f} GFLOP per forward")
        for dtype, e in f.items():
            if isinstance(e, dict):
                parts = [f"matmul peak {e['matmul_peak_gflops']:.3g} GFLOP/s"]
                for side in ("ours", "reference"):
                    if f"{side}_gflops" in e:
                        parts.append(
                            f"{side} {e[f'{side}_gflops']:.3g} GFLOP/s ({100 * e[f'{side}_of_peak']:.3g}% of peak)"
                        )
                lines.append(f"  {dtype}: " + ", ".join(parts))
    if report.get("psnr_bf16_vs_fp32"):
        lines.append("\nPSNR bfloat16 vs float32 images: " + ", ".join(
            f"{k} {v:.1f} dB" for k, v in report["psnr_bf16_vs_fp32"].items()))  # fmt: skip
    if report.get("W5_peak_rss"):
        mem = [f"{r['side']} {r['dtype']} {r.get('peak_rss_mb', float('nan')):.0f} MiB" for r in report["W5_peak_rss"]]
        lines.append("\nW5 peak RSS (separate processes): " + ", ".join(mem))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
