"""Attention layers of the U-Nets and the VAE.

* :class:`Attention` -- multi-head scaled dot-product attention ("Attention Is All You Need", Vaswani
  et al. 2017), self-attention or cross-attention to a ``context`` sequence. All attention goes through
  ``torch.nn.functional.scaled_dot_product_attention``.
* :class:`SpatialSelfAttention` -- the GroupNorm + self-attention + residual block that DDPM (Ho et al.
  2020) inserts at low resolutions; the VAE mid block uses it with a single head.
* :class:`SpatialTransformer` -- the latent-diffusion transformer (Rombach et al. 2022, "High-Resolution
  Image Synthesis with Latent Diffusion Models", section 3.3): GroupNorm, projection to tokens, blocks of
  self-attention, cross-attention to the text tokens and a GEGLU feed-forward (Shazeer 2020, "GLU
  Variants Improve Transformer"), projection back and a residual.

Module names (``to_q``, ``to_out.0``, ``attn1``, ``ff.net.0.proj``, ...) follow the reference weight
layout, so community checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusekit.networks.layers import Conv2d, GroupNorm, LayerNorm, Linear


class Attention(nn.Module):
    """Multi-head attention: queries from ``x`` (B, N, query_dim), keys/values from ``context``
    (B, L, context_dim), or from ``x`` itself when ``context`` is None.

    ``heads * head_dim`` is the inner width; ``to_out.0`` maps it back to ``query_dim``. With
    ``upcast`` the product is computed in float32 even for half-precision inputs.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        # (B, N, heads*d) -> (B, heads, N, d)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        # softmax(q k^T / sqrt(d)) v  (Vaswani et al. 2017, eq. 1)
        h = F.scaled_dot_product_attention(q, k, v).to(dtype)  # (B, heads, N, d)
        h = h.transpose(1, 2).reshape(B, N, -1)  # (B, N, heads*d)
        for layer in self.to_out:
            h = layer(h)
        return h  # (B, N, query_dim)


class SpatialSelfAttention(Attention):
    """``x + attention(GroupNorm(x))`` over the H*W positions of a feature map (DDPM, Ho et al. 2020).

    q/k/v carry biases. The VAE mid block uses one head (``head_dim = channels``).
    """

    def __init__(self, channels: int, *, heads: int, norm_groups: int, norm_eps: float) -> None:
        super().__init__(channels, heads=heads, head_dim=channels // heads, qkv_bias=True)
        self.group_norm = GroupNorm(norm_groups, channels, eps=norm_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C); self-attention only, context is not used
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class GEGLU(nn.Module):
    """``a * gelu(g)`` with ``[a, g] = proj(x)`` (Shazeer 2020), exact (erf) GELU."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width ``mult * dim`` (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to ``context``, GEGLU feed-forward, each
    with a residual (Rombach et al. 2022, Appendix / their ``BasicTransformerBlock``).

    With ``text_only`` the first attention attends to ``context`` too instead of to the image tokens, so
    both attentions are cross-attention (the reference's ``only_cross_attention``; the SD x4 upscaler)."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        context_dim: int,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        text_only: bool = False,
    ) -> None:
        super().__init__()
        head_dim = dim // heads
        self.text_only = text_only
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim if text_only else None,
                               dropout=dropout, upcast=upcast_attention)  # fmt: skip
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(
            dim,
            heads=heads,
            head_dim=head_dim,
            context_dim=context_dim,
            dropout=dropout,
            upcast=upcast_attention,
        )
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = h + self.attn1(self.norm1(h), context if self.text_only else None)  # (B, N, C) self- (or cross-)
        h = h + self.attn2(self.norm2(h), context)  # (B, N, C) cross-attention to (B, L, D)
        return h + self.ff(self.norm3(h))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """``x + proj_out(blocks(proj_in(GroupNorm(x))))`` on the tokens of a feature map (Rombach et al.
    2022). ``linear_projection`` selects Linear (SD-2.x) rather than 1x1-conv (SD-1.x) projections."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int,
        depth: int = 1,
        norm_groups: int = 32,
        linear_projection: bool = False,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        text_only: bool = False,
    ) -> None:
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in: nn.Module = Linear(channels, channels)
            self.proj_out: nn.Module = Linear(channels, channels)
        else:
            self.proj_in = Conv2d(channels, channels, 1)
            self.proj_out = Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                channels,
                heads=heads,
                context_dim=context_dim,
                dropout=dropout,
                upcast_attention=upcast_attention,
                text_only=text_only,
            )
            for _ in range(depth)
        )
        self.checkpointing = False  # recompute activations in the backward pass (UNet.set_gradient_checkpointing)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("SpatialTransformer needs a context tensor (B, L, context_dim)")
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if self.linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, HW, C)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))
        return x + h  # (B, C, H, W)
