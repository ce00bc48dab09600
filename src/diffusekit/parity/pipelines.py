"""Parity cases for whole pipelines (fixtures README section 6)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffusekit.io.models import load_unet
from diffusekit.io.weights import load_weights, read_json
from diffusekit.parity.report import Comparison, Skip
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import SamplerConfig

PIPELINE_TOL = {"rtol": 1e-3, "atol": 1e-3}


class Recorder(torch.nn.Module):
    """Wraps a network and records every call's inputs and output."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.config = net.config
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, **kw) -> Tensor:
        out = self.net(x, t, **kw)
        self.calls.append((x.clone(), torch.as_tensor(t).float().reshape(()), out.clone()))
        return out


def _stack_calls(rec: Recorder, i: int) -> Tensor:
    return torch.stack([c[i] for c in rec.calls])


def _sampler_config(case: Path, meta: dict) -> SamplerConfig:
    cfg = SamplerConfig.from_reference(read_json(case / "scheduler_config.json"))
    if cfg.sampler == "ddim":
        cfg = cfg.with_sampler("ddim", eta=float(meta.get("eta") or 0.0))
    return cfg


def unconditional_case(case: Path, meta: dict) -> Comparison:
    """DDPMPipeline / DDIMPipeline: one generator draws the initial noise, then each step's noise."""
    ref = load_weights(case / "io.safetensors")
    unet = Recorder(load_unet((case / meta["pipeline_dir"]) / "unet"))
    pipe = UnconditionalPipeline(unet, _sampler_config(case, meta))
    steps: list[StepInfo] = []
    n, _, h, w = ref["initial_noise"].shape
    images = pipe(
        n, steps=int(meta["num_inference_steps"]), height=h, width=w,
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])),
        callback=steps.append, show_progress=False,
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    cmp.check("unet_sample_in[0] (initial noise)", unet.calls[0][0], ref["initial_noise"])
    cmp.check("unet_timestep", _stack_calls(unet, 1), ref["unet_timestep"].float())
    cmp.check("unet_sample_in", _stack_calls(unet, 0), ref["unet_sample_in"])
    cmp.check("unet_out", _stack_calls(unet, 2), ref["unet_out"])
    cmp.check("step_prev_sample", torch.stack([s.x for s in steps]), ref["step_prev_sample"])
    cmp.check("final_sample", steps[-1].x, ref["final_sample"])
    cmp.check("images", images.permute(0, 2, 3, 1), ref["images"])
    return cmp


def text2img_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def img2img_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def inpaint_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")
