"""Parity cases for the noise schedules, the forward process and sampler trajectories."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffusekit.io.scheduler_config import REFERENCE_CLASSES, scheduler_from_diffusers
from diffusekit.io.weights import load_weights, read_json
from diffusekit.parity.report import Comparison, Skip
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler
from diffusekit.samplers.lcm import boundary_scalings


def forward_process_case(case: Path, meta: dict) -> Comparison:
    cfg = _reference_config(case)
    ref = load_weights(case / "tensors.safetensors")
    schedule = cfg.schedule()
    cmp = Comparison(rtol=1e-5, atol=1e-5)
    cmp.check("betas", schedule.betas, ref["betas"])
    cmp.check("alphas_cumprod", schedule.alphas_cumprod, ref["alphas_cumprod"])
    cmp.check("noisy", schedule.add_noise(ref["x0"], ref["noise"], ref["timesteps"]), ref["noisy"])
    cmp.check("velocity", schedule.velocity(ref["x0"], ref["noise"], ref["timesteps"]), ref["velocity"])
    return cmp


def _reference_config(case: Path) -> SamplerConfig:
    """The case's scheduler config; a scheduler class diffusekit does not implement is a SKIP, not a crash."""
    raw = read_json(case / "scheduler_config.json")
    name = raw.get("_class_name") if isinstance(raw, dict) else None
    if name not in REFERENCE_CLASSES:
        raise Skip(f"scheduler class {name!r} is not implemented; implemented: {', '.join(sorted(REFERENCE_CLASSES))}")
    return scheduler_from_diffusers(raw)


def scheduler_case(case: Path, meta: dict) -> Comparison:
    """Closed loop: run our sampler with the case's fake network and noise; compare every step."""
    cfg = _reference_config(case)
    if cfg.sampler == "ddim":
        cfg = cfg.with_sampler("ddim", eta=float(meta.get("eta") or 0.0))
    ref = load_weights(case / "tensors.safetensors")
    n = int(meta["num_inference_steps"])
    grid = build_grid(cfg, n)
    schedule = cfg.schedule()
    cmp = Comparison(rtol=1e-5, atol=1e-5)
    cmp.check("betas", schedule.betas, ref["betas"])
    cmp.check("alphas_cumprod", schedule.alphas_cumprod, ref["alphas_cumprod"])
    cmp.check("init_noise_sigma", torch.tensor(grid.init_noise_sigma), torch.tensor(float(meta["init_noise_sigma"])))
    if "sigmas" in ref:
        # two-stage samplers store each level once per call that uses it (Heun: s0, s1, s1, ..., 0): the
        # distinct levels in order are the grid's
        table = torch.unique_consecutive(ref["sigmas"]) if "stage" in ref else ref["sigmas"]
        cmp.check("sigmas", torch.cat([grid.sigmas, grid.sigmas_next[-1:]]), table)

    c_in, c_eps = float(meta["model_fn"]["c_input"]), float(meta["model_fn"]["c_eps"])
    model_eps = ref["model_eps"]
    calls: list[tuple[Tensor, Tensor]] = []

    def fake_model(x: Tensor, t: Tensor) -> Tensor:
        k = len(calls)
        calls.append((x, t))
        return c_in * x + c_eps * model_eps[k]

    noise = None
    if "noise" in ref:
        drawn = [k for k in range(len(ref["noise_drawn"])) if int(ref["noise_drawn"][k])]
        noise = {k: ref["noise"][k] for k in drawn}
    steps: list[StepInfo] = []
    x = ref["init_noise"] * grid.init_noise_sigma
    run_sampler(cfg, fake_model, x, grid, noise=(lambda k, like: noise[k]) if noise else None, callback=steps.append)

    k_calls = int(meta["num_model_calls"])
    if len(calls) != k_calls:
        cmp.failures.append(f"made {len(calls)} model calls, reference made {k_calls}")
        return cmp
    model_in = ref.get("model_input", ref["sample_in"])
    cmp.check("model_input", torch.stack([c[0] for c in calls]), model_in)
    cmp.check("timesteps", torch.stack([c[1] for c in calls]), ref["timesteps"].float())
    # the reference reports a result per network call, we report one per grid step
    ends = _step_ends(ref, k_calls, len(steps))
    cmp.check("prev_sample", torch.stack([s.x for s in steps]), ref["prev_sample"][ends])
    cmp.check("final_sample", steps[-1].x, ref["final_sample"])
    for key in ("denoised", "data_prediction"):  # LCM's consistency output, UniPC's x0 prediction
        if key in ref:
            cmp.check(key, torch.stack([s.x0 for s in steps]), ref[key])
    if "c_skip" in ref:
        c_skip, c_out = boundary_scalings(grid.timesteps.float(), cfg.timestep_scaling)
        cmp.check("c_skip", c_skip, ref["c_skip"])
        cmp.check("c_out", c_out, ref["c_out"])
    if cfg.sampler in ONE_STEP_SAMPLERS:
        _open_loop(cmp, cfg, grid, ref, meta)
    return cmp


def _step_ends(ref: dict[str, Tensor], num_calls: int, num_steps: int) -> list[int]:
    """Which reference call ends each of our grid steps.

    Two-stage samplers (Heun, KDPM2) store the stage of each call: a step ends at the call before the next
    stage-1 call, or at the last call. PNDM's N + 1 calls start with an intermediate prediction (the
    second call finishes the first step). Otherwise one call is one step.
    """
    if "stage" in ref:
        stage = ref["stage"].tolist()
        return [j for j in range(num_calls) if j == num_calls - 1 or stage[j + 1] == 1]
    if num_calls == num_steps + 1:
        return list(range(1, num_calls))
    return list(range(num_calls))


# samplers whose step depends only on (x, network output, noise): these are also checked open loop
ONE_STEP_SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "lcm")


def _open_loop(cmp: Comparison, cfg: SamplerConfig, grid, ref: dict[str, Tensor], meta: dict) -> None:
    """Feed each step the reference's own input and network output (fixtures README 3.3 (a)).

    The x0 estimate is only compared here: in a closed loop a last-bit difference in x_t is multiplied
    by 1 / sqrt(abar_t) (~160 at t = T-1) before it reaches x0.
    """
    prev, x0s = [], []
    for k in range(len(grid)):
        out = ref["model_output"][k]
        step: list[StepInfo] = []
        noise = (lambda i, like, k=k: ref["noise"][k]) if "noise" in ref else None
        x = ref["sample_in"][k]
        run_sampler(cfg, lambda x_t, t, out=out: out, x, grid[k : k + 1], noise=noise, callback=step.append)
        prev.append(step[0].x)
        x0s.append(step[0].x0)
    cmp.check("prev_sample (open loop)", torch.stack(prev), ref["prev_sample"])
    if meta.get("reports_pred_original_sample") and "pred_original_sample" in ref:
        cmp.check("pred_original_sample (open loop)", torch.stack(x0s), ref["pred_original_sample"])
