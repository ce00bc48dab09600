"""Building blocks shared by the U-Nets and the VAE: the residual block, down/up-sampling, and the
per-resolution-level blocks that chain them with optional attention.

The residual block is the one of DDPM (Ho et al. 2020, Appendix B), after Wide ResNets (Zagoruyko &
Komodakis 2016) with GroupNorm (Wu & He 2018); the VAE reuses it without a time input (Rombach et al.
2022). Module names follow the reference weight layout (``resnets.0.conv1``, ``downsamplers.0.conv``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusekit.networks.attention import SpatialSelfAttention, SpatialTransformer
from diffusekit.networks.layers import Conv2d, GroupNorm, Linear

#: builds the attention layer of one resnet slot, given its channel count; called as ``attn(h, context)``
AttentionFactory = Callable[[int], nn.Module]


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + proj(SiLU(emb)))))``.

    ``emb_dim=None`` (VAE) drops the embedding input. The shortcut is a 1x1 conv when the channel count
    changes, else the identity.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        emb_dim: int | None,
        norm_groups: int,
        norm_eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(emb_dim, out_channels) if emb_dim is not None else None
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.checkpointing = False  # recompute activations in the backward pass (UNet.set_gradient_checkpointing)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # + (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """3x3 convolution with stride 2.

    ``asymmetric_pad=False``: padding 1 on every side (U-Nets). ``True``: zero-pad only the right and
    bottom by one pixel, then convolve without padding -- TensorFlow's "SAME" rule, used by the original
    DDPM code and by the LDM/SD VAE encoder.
    """

    def __init__(self, channels: int, *, asymmetric_pad: bool = False) -> None:
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


def _attentions(make_attention: AttentionFactory | None, channels: int, n: int) -> nn.ModuleList | None:
    return None if make_attention is None else nn.ModuleList(make_attention(channels) for _ in range(n))


class DownLevel(nn.Module):
    """One encoder level: ``num_layers`` residual blocks (each followed by its attention, if any), then
    an optional stride-2 downsample. Returns the features and every intermediate output (the U-Net skips).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        emb_dim: int | None,
        norm_groups: int,
        norm_eps: float,
        downsample: bool,
        asymmetric_pad: bool = False,
        make_attention: AttentionFactory | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                emb_dim=emb_dim,
                norm_groups=norm_groups,
                norm_eps=norm_eps,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.attentions = _attentions(make_attention, out_channels, num_layers)
        self.downsamplers = (
            nn.ModuleList([Downsample(out_channels, asymmetric_pad=asymmetric_pad)]) if downsample else None
        )

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)  # (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            outputs.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B, C_out, H/2, W/2)
            outputs.append(h)
        return h, outputs


class UpLevel(nn.Module):
    """One decoder level: residual blocks (each after concatenating a skip, when ``skip_channels`` are
    given, and followed by its attention, if any), then an optional nearest x2 upsample + conv.

    ``skip_channels[i]`` is the channel count of the skip consumed by block ``i``; pass
    ``num_layers`` without skips for the VAE decoder.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        emb_dim: int | None,
        norm_groups: int,
        norm_eps: float,
        upsample: bool,
        skip_channels: list[int] | None = None,
        make_attention: AttentionFactory | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        skips = skip_channels if skip_channels is not None else [0] * num_layers
        self.uses_skips = skip_channels is not None
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (in_channels if i == 0 else out_channels) + skips[i],
                out_channels,
                emb_dim=emb_dim,
                norm_groups=norm_groups,
                norm_eps=norm_eps,
                dropout=dropout,
            )
            for i in range(num_layers)
        )
        self.attentions = _attentions(make_attention, out_channels, num_layers)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor] | None = None,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            if self.uses_skips:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W): current features first
            h = resnet(h, emb)  # (B, C_out, H, W)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)  # (B, C_out, 2H, 2W)
        return h


class MidBlock(nn.Module):
    """Bottleneck: residual block, attention (optional), residual block."""

    def __init__(
        self,
        channels: int,
        *,
        emb_dim: int | None,
        norm_groups: int,
        norm_eps: float,
        make_attention: AttentionFactory | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(
                channels,
                channels,
                emb_dim=emb_dim,
                norm_groups=norm_groups,
                norm_eps=norm_eps,
                dropout=dropout,
            )
            for _ in range(2)
        )
        self.attentions = _attentions(make_attention, channels, 1)

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.resnets[0](h, emb)  # (B, C, H, W)
        if self.attentions is not None:
            h = self.attentions[0](h, context)
        return self.resnets[1](h, emb)  # (B, C, H, W)


def init_weights(model: nn.Module, zero: tuple[nn.Module, ...] = ()) -> None:
    """The one place where fresh weights are drawn (loading a checkpoint overwrites them).

    Convolutions and linear layers: Xavier-uniform weights and zero biases, as in DDPM (Ho et al. 2020,
    their ``variance_scaling(1, fan_avg)``); normalisation layers: unit scale, zero shift; embedding
    tables: N(0, 1). The last layer of every residual branch -- ``ResnetBlock.conv2``, the output
    projection of ``SpatialSelfAttention`` and ``SpatialTransformer`` -- and any module in ``zero`` start
    at zero, so each block starts as the identity (DDPM; Dhariwal & Nichol 2021; Rombach et al. 2022).
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight)
    zero_out = list(zero)
    for m in model.modules():
        if isinstance(m, ResnetBlock):
            zero_out.append(m.conv2)
        elif isinstance(m, SpatialSelfAttention):
            zero_out.append(m.to_out[0])
        elif isinstance(m, SpatialTransformer):
            zero_out.append(m.proj_out)
    for m in zero_out:
        for p in m.parameters():
            nn.init.zeros_(p)
