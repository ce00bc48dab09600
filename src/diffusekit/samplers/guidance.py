"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusekit.errors import ConfigError

Network = Callable[..., Tensor]  # network(x, t, **conditioning) -> raw output


def guided(network: Network, guidance_scale: float, uncond: dict[str, Tensor], cond: dict[str, Tensor]) -> Network:
    """A model(x, t) that evaluates ``network`` with and without conditioning and mixes the outputs:
    out = out_uncond + s (out_cond - out_uncond).

    Both halves go through the network as one doubled batch [uncond; cond]. ``guidance_scale`` == 1
    means no guidance: the network is called once, with ``cond`` only. Conditioning tensors are
    batch-first; per-call extras (e.g. inpainting channels) can be passed to the returned model.
    """
    if not guidance_scale >= 0:
        raise ConfigError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
    if guidance_scale == 1.0:  # (s < 1 interpolates toward the unconditional output: still two halves)
        return lambda x, t, **extra: network(x, t, **cond, **extra)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model(x: Tensor, t: Tensor, **extra: Tensor) -> Tensor:
        doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = network(torch.cat([x, x]), t, **both, **doubled)  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return model
