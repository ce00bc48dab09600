"""SDXL at 1024x1024 on this machine: seconds per denoising step (the U-Net at SDXL-base size, 2.6B parameters,
batch 2 for classifier-free guidance, 128x128 latents, 2048-wide context, pooled text and micro-conditioning ids)
and seconds for the VAE decode of one 1024x1024 image (SD/SDXL VAE size, float32, decoded in tiles), with the
process's peak resident memory. Random weights: timing and memory do not depend on the weights' values.

The U-Net config is SDXL-base's published ``unet/config.json`` values (block_out_channels 320/640/1280,
transformer_layers_per_block 1/2/10, 64-wide heads, cross_attention_dim 2048, text_time embedding 2816 -> 1280),
translated by diffusekit's own reader. ``--dtype bfloat16`` keeps the U-Net in bfloat16 (fast on CPUs with native
bfloat16, float32 compute for it elsewhere, through the runtime plan).

    python benchmarks/sdxl_1024.py [--dtype bfloat16] [--json benchmarks/results/sdxl_1024.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from diffusekit.bench import harness
from diffusekit.io.unet_config import unet_from_diffusers
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import VAE_PRESETS, AutoencoderKL
from diffusekit.runtime.policy import Plan, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY_SDXL_UNET = ROOT.parent / "shared" / "fixtures" / "pipelines" / "stable_diffusion_xl" / "unet" / "config.json"
SDXL_BASE = {  # the published SDXL-base values that differ from the tiny fixture's config
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "sample_size": 128,
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--steps", type=int, default=2, help="timed U-Net calls after one warm-up call")
    p.add_argument("--vae-tile", type=int, default=64, help="latent pixels per VAE decode tile (64 = 512 px)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = unet_from_diffusers({**json.loads(TINY_SDXL_UNET.read_text()), **SDXL_BASE})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(dtype)  # build the 2.6B weights in their final dtype (no float32 copy first)
    try:
        unet = UNet(config)
    finally:
        torch.set_default_dtype(torch.float32)
    prepare(unet, Plan(dtype=dtype))
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(2, 4, 128, 128, dtype=dtype)
    context = torch.randn(2, 77, 2048, dtype=dtype)
    pooled = torch.randn(2, 1280, dtype=dtype)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, dtype=dtype)
    step_seconds = []
    with torch.inference_mode():
        for i in range(args.steps + 1):
            t = time.perf_counter()
            unet(x, torch.tensor([500, 500]), context=context, pooled=pooled, time_ids=time_ids)
            if i > 0:
                step_seconds.append(time.perf_counter() - t)
    unet_peak = peak_rss_gib()
    del unet
    vae = prepare(AutoencoderKL(VAE_PRESETS["sd"]), Plan(dtype=torch.float32))
    z = torch.randn(1, 4, 128, 128)
    with torch.inference_mode():
        t = time.perf_counter()
        image = vae.decode(z, tile=args.vae_tile)
        decode_seconds = time.perf_counter() - t
    step = min(step_seconds)
    report = {
        "machine": harness.machine(),
        "dtype": args.dtype,
        "unet_parameters": params,
        "build_seconds": built,
        "unet_step_seconds": step_seconds,
        "vae_decode_seconds": decode_seconds,
        "vae_tile_latent_px": args.vae_tile,
        "image_shape": list(image.shape),
        "peak_rss_gib_after_unet": unet_peak,
        "peak_rss_gib": peak_rss_gib(),
        "extrapolated_seconds_per_image": {n: n * step + decode_seconds for n in (20, 30)},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        harness.write_report(args.json, report)


if __name__ == "__main__":
    main()
