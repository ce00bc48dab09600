"""On a CUDA device: diffusekit's W3 (SD U-Net forward) and W4 (SD VAE decode 64->512) with and without the
channels-last layout the runtime plan applies, in float32 and bfloat16, beside the reference's W4 (same weights),
and the top CUDA kernels of our W4 in bfloat16 from torch.profiler. A probe of why W4 ran 1.15-1.22x the
reference's time on an H200 (benchmarks/README.md, GPU table).

    python benchmarks/gpu_layout.py            # needs CUDA; the reference (diffusers) is optional
"""

from __future__ import annotations

import json
import time

import torch

from diffusekit.bench.workloads import inputs, spec
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.runtime.policy import Plan, prepare


def clock(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def ours_vae(state: dict, s4, dtype: torch.dtype, channels_last: bool, z: torch.Tensor) -> float:
    vae = AutoencoderKL(s4.vae)
    vae.load_state_dict(state)
    prepare(vae, Plan(dtype=dtype, channels_last=channels_last), device="cuda")
    with torch.inference_mode():
        return clock(lambda: vae.decode(z))


def ours_unet(state: dict, s3, dtype: torch.dtype, channels_last: bool, x: dict) -> float:
    unet = UNet(s3.unet)
    unet.load_state_dict(state)
    prepare(unet, Plan(dtype=dtype, channels_last=channels_last), device="cuda")
    with torch.inference_mode():
        return clock(lambda: unet(x["x"], x["t"], context=x["context"]))


def reference_vae(state: dict, s4, dtype: torch.dtype, z: torch.Tensor) -> float:
    import diffusers

    from diffusekit.io.vae_config import vae_to_diffusers

    ref = diffusers.AutoencoderKL.from_config(vae_to_diffusers(s4.vae))
    ref.load_state_dict(state)
    ref.to("cuda", dtype).eval()
    with torch.inference_mode():
        return clock(lambda: ref.decode(z).sample)


def main() -> None:
    dev = "cuda"
    rows = []
    s4, s3 = spec("W4"), spec("W3")
    torch.manual_seed(0)
    vae_state = AutoencoderKL(s4.vae).state_dict()
    unet_state = UNet(s3.unet).state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        z = inputs("W4", s4, dtype)["z"].to(dev)
        x3 = {k: v.to(dev) for k, v in inputs("W3", s3, dtype).items()}
        for cl in (True, False):
            t4 = ours_vae(vae_state, s4, dtype, cl, z)
            t3 = ours_unet(unet_state, s3, dtype, cl, x3)
            torch.cuda.empty_cache()
            rows.append({"dtype": str(dtype), "channels_last": cl, "W4_ours_s": t4, "W3_ours_s": t3})
            print(json.dumps(rows[-1]), flush=True)
        try:
            rows.append({"dtype": str(dtype), "W4_reference_s": reference_vae(vae_state, s4, dtype, z)})
            print(json.dumps(rows[-1]), flush=True)
        except ImportError:
            pass
    vae = AutoencoderKL(s4.vae)
    vae.load_state_dict(vae_state)
    prepare(vae, Plan(dtype=torch.bfloat16), device=dev)
    z = inputs("W4", s4, torch.bfloat16)["z"].to(dev)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        vae.decode(z)
        torch.cuda.synchronize()
    for key in ("device_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
            break
        except (KeyError, AttributeError, ValueError):
            continue


if __name__ == "__main__":
    main()
