"""Timestep embeddings: the sinusoidal features of "Attention Is All You Need" (Vaswani et al. 2017,
section 3.5) applied to the diffusion time, as in DDPM (Ho et al. 2020, Appendix B), followed by a
2-layer MLP.

Module names (``linear_1``, ``linear_2``) follow the reference weight layout so that community
checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusekit.networks.layers import Linear


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of the (possibly fractional) timesteps ``t``, shape (B,) -> (B, dim).

    ``freqs[i] = exp(-ln(max_period) * i / (dim/2 - freq_shift))`` for ``i < dim/2``; the features are
    ``[sin(t * freqs), cos(t * freqs)]``, or ``[cos, sin]`` when ``flip_sin_to_cos``. Fractional timesteps
    (Euler-type samplers) are used as they are, never rounded. Computed in float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_2(SiLU(linear_1(features)))``: sinusoidal features -> the embedding ``emb`` that every
    residual block adds to its activations (DDPM, Ho et al. 2020)."""

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = Linear(in_features, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = Linear(embed_dim, embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (B, embed_dim)
