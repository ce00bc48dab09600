"""The benchmark workloads W1-W8 on diffusekit's side, at full size or tiny (for smoke tests).

Each builder returns a ``Case``: a zero-argument ``run`` whose result (an image or output tensor, or a
loss) is what the comparison checks across implementations. Inputs come from :func:`inputs`, seeded, so
another implementation fed the same inputs and weights must give the same output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.text import load_tokenizer
from diffusekit.networks.text_encoder import TEXT_ENCODER_PRESETS, ClipTextEncoder
from diffusekit.networks.unet import UNET_PRESETS, UNet, UNetConfig
from diffusekit.networks.vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from diffusekit.pipelines.common import LatentCodec
from diffusekit.pipelines.loading import load_pipeline, save_pipeline
from diffusekit.pipelines.recipe import DTYPES, chosen_dtype
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.runtime.policy import Plan, autoencoder_plan, prepare
from diffusekit.samplers.presets import SD1

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8")
QUICK = ("W1", "W2", "W6")
ON_REQUEST = ("W8",)  # run only when named: 1000 sampler steps, ~50 minutes a side on 2 CPU cores
DEFAULT = tuple(w for w in WORKLOADS if w not in ON_REQUEST)

TITLES = {
    "W1": "DDPM CIFAR-10 U-Net forward, batch 16",
    "W2": "DDPM CIFAR-10 U-Net training step (AdamW), batch 16",
    "W3": "SD-1.5 U-Net forward, 2x4x64x64 + 2x77x768",
    "W4": "SD VAE decode, 64x64 latent -> 512x512",
    "W5": "text-to-image 512x512, 20 steps DPM++2M, CFG 7.5, SD-1.5 size",
    "W6": "text-to-image 256x256, 20 steps, tiny reference pipeline",
    "W7": "DDIM 50 steps, one 256x256 image, DDPM CelebA-HQ-size U-Net (pixels)",
    "W8": "DDPM 1000 steps, one 256x256 image, DDPM CelebA-HQ-size U-Net (pixels)",
}

#: The scheduler configuration the DDPM releases (CIFAR-10, CelebA-HQ, LSUN) ship, as a reference
#: ``scheduler_config.json``: linear betas from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020, section 4), the
#: predicted x0 clipped to [-1, 1]. Both sides of W7/W8 read it; W7 samples it with DDIM (eta 0, Song et al.
#: 2021, eq. 12), W8 with the ancestral DDPM sampler (Ho et al. 2020, algorithm 2).
DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "clip_sample": True,
    "variance_type": "fixed_small",
}
PIXEL_SAMPLERS = {"W7": ("ddim", 50), "W8": ("ddpm", 1000)}  # workload -> (sampler, steps at full size)
NOISE_SEED = 1234  # the generator of the initial noise (and of DDPM's per-step noise), the same on both sides


@dataclass(frozen=True)
class Spec:
    """Sizes of one workload."""

    unet: UNetConfig | None = None
    vae: VAEConfig | None = None
    batch: int = 1
    size: int = 32  # input height/width (pixels for W1/W2, latents for W3/W4, image for W5/W6)
    context_len: int = 77
    steps: int = 20
    prompt: str = "a photograph of an astronaut riding a horse"


def spec(name: str, *, tiny: bool = False) -> Spec:
    """The sizes of workload ``name`` (the full sizes of benchmarks/README.md, or a tiny stand-in when ``tiny``)."""
    if name in ("W1", "W2"):
        cfg = UNET_PRESETS["tiny" if tiny else "ddpm-cifar10"]
        if name == "W2":  # no dropout: both implementations must take the same step from the same weights
            cfg = dataclasses.replace(cfg, dropout=0.0)
        return Spec(unet=cfg, batch=2 if tiny else 16, size=cfg.sample_size)
    if name == "W3":
        return Spec(unet=UNET_PRESETS["tiny-text" if tiny else "sd15"], batch=2, size=8 if tiny else 64)
    if name == "W4":
        return Spec(vae=VAE_PRESETS["tiny" if tiny else "sd"], batch=1, size=8 if tiny else 64)
    if name == "W5":
        return Spec(
            unet=UNET_PRESETS["tiny-text" if tiny else "sd15"],
            vae=VAE_PRESETS["tiny" if tiny else "sd"],
            size=32 if tiny else 512,
            steps=2 if tiny else 20,
        )
    if name == "W6":
        return Spec(size=64 if tiny else 256, steps=2 if tiny else 20)
    if name in PIXEL_SAMPLERS:
        cfg = UNET_PRESETS["tiny" if tiny else "ddpm-celebahq-256"]
        return Spec(unet=cfg, size=cfg.sample_size, steps=3 if tiny else PIXEL_SAMPLERS[name][1])
    raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def inputs(name: str, s: Spec, dtype: torch.dtype, *, latent_channels: int = 4, latent_factor: int = 8) -> dict:
    """Seeded inputs of workload ``name``, in ``dtype`` (W5/W6: float32 initial latents)."""
    g = torch.Generator().manual_seed(1234)
    if name in ("W1", "W2"):
        c = s.unet
        x = torch.randn(s.batch, c.in_channels, s.size, s.size, generator=g)
        t = torch.randint(0, 1000, (s.batch,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        return {"x": x.to(dtype), "t": t, "target": noise.to(dtype)}
    if name == "W3":
        c = s.unet
        x = torch.randn(s.batch, c.in_channels, s.size, s.size, generator=g)
        ctx = torch.randn(s.batch, s.context_len, c.cross_attention_dim, generator=g)
        return {"x": x.to(dtype), "t": torch.tensor([801] * s.batch), "context": ctx.to(dtype)}
    if name == "W4":
        z = torch.randn(s.batch, s.vae.latent_channels, s.size, s.size, generator=g)
        return {"z": z.to(dtype)}
    if name in ("W5", "W6"):
        h = s.size // latent_factor
        return {"latents": torch.randn(1, latent_channels, h, h, generator=g)}
    raise KeyError(name)


def noise_generator() -> torch.Generator:
    """The CPU generator W7/W8 draw x_T (and then DDPM's per-step noise) from, on both sides."""
    return torch.Generator().manual_seed(NOISE_SEED)


@dataclass
class Case:
    run: Callable[[], torch.Tensor]
    model: torch.nn.Module | None = None


def _unet(cfg: UNetConfig, dtype: torch.dtype, state: dict | None, device: str, *, train: bool = False) -> UNet:
    model = UNet(cfg)
    if state is not None:
        model.load_state_dict(state)
    prepare(model, Plan(dtype=dtype, inference=not train), device=device)
    return model


def _to(inp: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inp.items()}


def ours(
    name: str,
    s: Spec,
    dtype: torch.dtype | None,
    *,
    state: dict | None = None,
    folder: str | Path | None = None,
    device: str = "cpu",
) -> Case:
    """diffusekit's side of workload ``name``. ``state``: weights (our key names = the reference's) for
    W1-W4; ``folder``: the diffusers-layout model folder for W5/W6. ``dtype=None`` (W5/W6): the command line's
    default for this machine (``--dtype auto``)."""
    if name in ("W1", "W3"):
        model = _unet(s.unet, dtype, state, device)
        inp = _to(inputs(name, s, dtype), device)
        extra = {"context": inp["context"]} if "context" in inp else {}

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return model(inp["x"], inp["t"], **extra)

        return Case(forward, model)
    if name == "W2":
        model = _unet(s.unet, dtype, state, device, train=True)
        inp = _to(inputs(name, s, dtype), device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(inp["x"], inp["t"]).float(), inp["target"].float())
            loss.backward()
            opt.step()
            return loss.detach()

        return Case(step, model)
    if name == "W4":
        vae = AutoencoderKL(s.vae)
        if state is not None:
            vae.load_state_dict(state)
        prepare(vae, autoencoder_plan(Plan(), device, dtype), device=device)  # as the pipeline plans its VAE
        z = inputs(name, s, dtype)["z"].to(device)

        def decode() -> torch.Tensor:
            with torch.inference_mode():
                return vae.decode(z)

        return Case(decode, vae)
    if name in ("W5", "W6"):
        if dtype is None:  # as `diffusekit txt2img` without --dtype runs: bf16 where native, else float32
            dtype = DTYPES[chosen_dtype(None, device)]
        sd = load_pipeline(folder, dtype=dtype, device=device)
        pipe = TextToImage(sd)
        lat = inputs(name, s, torch.float32, latent_channels=sd.codec.channels,
                     latent_factor=sd.codec.downsample_factor)["latents"]  # fmt: skip

        def generate() -> torch.Tensor:
            return pipe(s.prompt, height=s.size, width=s.size, steps=s.steps, guidance_scale=7.5,
                        sampler="dpmpp_2m", latents=lat, show_progress=False).images  # fmt: skip

        return Case(generate, sd.unet)
    if name in PIXEL_SAMPLERS:
        return _pixel_sampling(name, s, dtype, state, device)
    raise KeyError(name)


def _pixel_sampling(name: str, s: Spec, dtype: torch.dtype | None, state: dict | None, device: str) -> Case:
    """W7/W8: one image from the pixel-space U-Net, DDIM or DDPM over :data:`DDPM_SCHEDULER`."""
    dtype = dtype or torch.float32
    pipe = UnconditionalPipeline(_unet(s.unet, dtype, state, device), scheduler_from_diffusers(DDPM_SCHEDULER))
    sampler = PIXEL_SAMPLERS[name][0]

    def generate() -> torch.Tensor:
        g = noise_generator()
        shape = (1, s.unet.out_channels, s.size, s.size)
        # x_T as the reference's pipelines draw it (randn in the U-Net's dtype); g then draws DDPM's step noise
        x_t = torch.randn(shape, generator=g, dtype=dtype).to(device)
        return pipe(1, steps=s.steps, sampler=sampler, eta=0.0 if sampler == "ddim" else None, latents=x_t,
                    generator=g if device == "cpu" else None, show_progress=False)  # fmt: skip

    return Case(generate, pipe.unet)


def save_random_pipeline(folder: str | Path, s: Spec, tokenizer_folder: str | Path, *, seed: int = 0) -> Path:
    """A diffusers-layout Stable Diffusion folder with diffusekit's fresh random weights at the sizes of
    ``s`` (W5) and the tokenizer of ``tokenizer_folder``: the W5 model when no reference is installed."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_folder)
    text = TEXT_ENCODER_PRESETS["tiny" if s.unet.cross_attention_dim == 32 else "sd1"]
    vocab = tokenizer_vocab_size(tokenizer_folder)
    text = dataclasses.replace(text, vocab_size=vocab, bos_id=vocab - 2, eos_id=vocab - 1, pad_id=vocab - 1)
    sampler = SD1.with_sampler("dpmpp_2m")
    sd = StableDiffusion(UNet(s.unet), LatentCodec(AutoencoderKL(s.vae)), tokenizer, ClipTextEncoder(text), sampler)
    save_pipeline(sd, folder)
    return Path(folder)


def tokenizer_vocab_size(folder: str | Path) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text()))
