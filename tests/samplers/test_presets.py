"""Named presets hold the schedules their model families were released with (checked against the reference's
own SD-1.x scheduler configs in the fixtures)."""

from __future__ import annotations

import dataclasses
import json

import torch

from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.weights import load_weights
from diffusekit.samplers.presets import PRESETS, SD1, SDXL


def test_sd1_preset_is_the_released_sd1_scheduler(fixtures_dir):
    case = fixtures_dir / "schedulers" / "pndm_sd_n10"
    released = scheduler_from_diffusers(json.loads((case / "scheduler_config.json").read_text()))
    assert dataclasses.replace(released, reference_rules=False) == SD1
    ref = load_weights(case / "tensors.safetensors")
    torch.testing.assert_close(SD1.schedule().alphas_cumprod, ref["alphas_cumprod"].double(), rtol=1e-6, atol=0)


def test_sdxl_preset_shares_the_schedule_with_the_euler_sampler():
    assert SDXL.sampler == "euler" and dataclasses.replace(SDXL, sampler="pndm") == SD1
    assert PRESETS == {"sd1": SD1, "sdxl": SDXL}
