"""The U-Net denoiser of pixel-space DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")
and of latent diffusion / Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), after Ronneberger et al. 2015.

One network covers both: levels of residual blocks with optional attention, a bottleneck, and mirrored
up levels fed by skip connections. Attention is plain spatial self-attention when
``cross_attention_dim`` is None (pixel DDPM) and a transformer with cross-attention to text tokens
otherwise (LDM/SD). Conditioning enters by name (see STYLE.md): ``emb`` (time, class; added),
``concat`` (mask, masked image; stacked on channels), ``context`` (text tokens; cross-attention).

The module tree uses the reference weight names, so a diffusers ``UNet2DModel`` /
``UNet2DConditionModel`` state dict loads as it is. The network is built from a
:class:`~diffusekit.networks.unet_config.UNetConfig`; the reference's ``config.json`` is translated to and
from it at the boundary, in ``diffusekit.io.unet_config``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.networks.attention import SpatialSelfAttention, SpatialTransformer
from diffusekit.networks.blocks import AttentionFactory, DownLevel, MidBlock, ResnetBlock, UpLevel, init_weights
from diffusekit.networks.embeddings import TimestepEmbedding, timestep_embedding
from diffusekit.networks.layers import Conv2d, GroupNorm
from diffusekit.networks.unet_config import UNET_PRESETS, UNetConfig

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig"]  # the config and presets live in unet_config.py


class UNet(nn.Module):
    """The U-Net noise predictor: ``forward(x, t, *, context, class_labels, concat) -> (B, out, H, W)``.

    It returns the raw network output; what it means (eps, x0 or v) is the parametrization's business.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.time_embedding = TimestepEmbedding(c.channels[0], c.emb_dim)
        self.class_embedding = nn.Embedding(c.num_classes, c.emb_dim) if c.num_classes is not None else None
        # SDXL's added embedding of [pooled text, sinusoid(time ids)] (the reference's "text_time" add_embedding)
        self.add_embedding = (
            TimestepEmbedding(c.text_time_features, c.emb_dim) if c.text_time_features is not None else None
        )
        self.conv_in = Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        common = dict(emb_dim=c.emb_dim, norm_groups=c.norm_groups, norm_eps=c.norm_eps, dropout=c.dropout)

        skip_channels = [c.channels[0]]  # channels of every tensor pushed on the skip stack
        down, prev = [], c.channels[0]
        for level, ch in enumerate(c.channels):
            last = level == c.levels - 1
            down.append(
                DownLevel(
                    prev,
                    ch,
                    num_layers=c.layers_per_block,
                    downsample=not last,
                    asymmetric_pad=c.downsample_pad == "right_bottom",
                    make_attention=self._attention_factory(level) if c.attention_levels[level] else None,
                    **common,
                )
            )
            skip_channels += [ch] * (c.layers_per_block + (0 if last else 1))
            prev = ch
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock(
            c.channels[-1],
            make_attention=self._attention_factory(c.levels - 1, mid=True) if c.mid_attention else None,
            **common,
        )
        up = []
        for level in reversed(range(c.levels)):
            ch = c.channels[level]
            up.append(
                UpLevel(
                    prev,
                    ch,
                    num_layers=c.layers_per_block + 1,
                    skip_channels=[skip_channels.pop() for _ in range(c.layers_per_block + 1)],
                    upsample=level != 0,
                    make_attention=self._attention_factory(level) if c.attention_levels[level] else None,
                    **common,
                )
            )
            prev = ch
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = GroupNorm(c.norm_groups, c.channels[0], eps=c.norm_eps)
        self.conv_out = Conv2d(c.channels[0], c.out_channels, 3, padding=1)
        init_weights(self, zero=(self.conv_out,))
        # another runtime for forward() (e.g. pipelines.openvino_unet), called as engine(self, x, t, **inputs)
        # after the inputs are validated; None: PyTorch (forward_torch)
        self.engine: Callable[..., torch.Tensor] | None = None

    def _attention_factory(self, level: int, mid: bool = False) -> AttentionFactory:
        """The attention layer of ``level`` (or, with ``mid``, of the bottleneck, which uses the last
        level's heads and self-attention first)."""
        c = self.config
        heads = c.num_heads[level]
        text_only = not mid and c.text_only_attention is not None and c.text_only_attention[level]
        if c.cross_attention_dim is None:
            return lambda ch: SpatialSelfAttention(
                ch, heads=heads, norm_groups=c.norm_groups, norm_eps=c.norm_eps
            )
        return lambda ch: SpatialTransformer(
            ch,
            heads=heads,
            context_dim=c.cross_attention_dim,
            depth=c.depth_per_level[level],
            norm_groups=c.norm_groups,
            linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
            text_only=text_only,
        )

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each residual block's and transformer's activations in the backward pass instead of
        keeping them (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): less memory for
        about one more forward pass of time. Outputs and gradients are unchanged; inference is unaffected."""
        for module in self.modules():
            if isinstance(module, ResnetBlock | SpatialTransformer):
                module.checkpointing = bool(on)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy ``x`` (B, C, H, W) at timesteps ``t`` (0-d or (B,), int or float; fractional
        values are used as they are). ``context`` (B, L, cross_attention_dim): text tokens for
        cross-attention. ``class_labels`` (B,) int64. ``concat`` (B, C', H, W): extra channels stacked
        after ``x`` (inpainting mask + masked latents), so that C + C' == in_channels. ``pooled`` (B, P) and
        ``time_ids`` (B, K): SDXL's pooled text embedding and size/crop values (``text_time_features``)."""
        t = self._check_inputs(x, t, context, class_labels, concat)
        self._check_text_time(x.shape[0], pooled, time_ids)
        inputs = {"context": context, "class_labels": class_labels, "concat": concat, "pooled": pooled,
                  "time_ids": time_ids}  # fmt: skip
        if self.engine is not None:
            return self.engine(self, x, t, **inputs)
        return self.forward_torch(x, t, **inputs)

    def forward_torch(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` on PyTorch's kernels, whatever the ``engine``, for inputs it has validated (``t``
        a (B,) tensor)."""
        c = self.config
        if concat is not None:
            x = torch.cat([x, concat], dim=1)  # (B, in_channels, H, W)
        features = timestep_embedding(
            t, c.channels[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )
        emb = self.time_embedding(features.to(x.dtype))  # (B, 4*C0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)  # (B, 4*C0)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(self._text_time_features(pooled, time_ids).to(emb.dtype))  # (B, 4*C0)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, context)  # (B, C_l, H/2^l, W/2^l) after level l's downsample
            skips += outputs
        h = self.mid_block(h, emb, context)  # (B, C_last, H/2^(L-1), W/2^(L-1))
        for block in self.up_blocks:
            h = block(h, skips, emb, context)  # consumes layers_per_block + 1 skips per level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    def _text_time_features(self, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """``[pooled, sinusoid(time_ids[:, 0]), ..., sinusoid(time_ids[:, K-1])]`` (B, P + K x time_id_features):
        each size/crop value gets the timestep's sinusoidal features (SDXL, Podell et al. 2023, sec. 2.2)."""
        c = self.config
        B, K = time_ids.shape
        features = timestep_embedding(
            time_ids.reshape(-1), c.time_id_features, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift
        )  # (B*K, time_id_features)
        return torch.cat([pooled.float(), features.reshape(B, K * c.time_id_features)], dim=-1)

    def _check_text_time(self, B: int, pooled: Any, time_ids: Any) -> None:
        """``pooled`` (B, P) and ``time_ids`` (B, K) with P + K x time_id_features == text_time_features, or
        both None for a U-Net without the added text/time embedding."""
        c = self.config
        if c.text_time_features is None:
            if pooled is not None or time_ids is not None:
                raise ConfigError("pooled / time_ids were given but this UNet has no added text/time embedding; "
                                  "pass None")  # fmt: skip
            return
        for name, v in (("pooled", pooled), ("time_ids", time_ids)):
            if v is None:
                raise ConfigError(f"{name} is required: this UNet adds an embedding of the pooled text and the "
                                  "size/crop time ids (SDXL)")  # fmt: skip
            if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[0] != B or not v.is_floating_point():
                raise ConfigError(f"{name} must be a floating-point ({B}, N) tensor, got {_describe(v)}")
        width = pooled.shape[1] + time_ids.shape[1] * c.time_id_features
        if width != c.text_time_features:
            raise ConfigError(
                f"pooled ({pooled.shape[1]} features) + time_ids ({time_ids.shape[1]} values x "
                f"{c.time_id_features}) give {width} features; this UNet's text_time_features is "
                f"{c.text_time_features}"
            )

    def _check_inputs(
        self,
        x: Any,
        t: Any,
        context: Any,
        class_labels: Any,
        concat: Any,
    ) -> torch.Tensor:
        """Validate the arguments of forward() with messages that name them; return ``t`` as a (B,) tensor."""
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ConfigError(f"x must be a (B, C, H, W) tensor, got {_describe(x)}")
        B, C, H, W = x.shape
        extra = 0
        if concat is not None:
            if (
                not isinstance(concat, torch.Tensor)
                or concat.ndim != 4
                or concat.shape[0] != B
                or concat.shape[2:] != x.shape[2:]
            ):
                raise ConfigError(
                    f"concat must be a ({B}, C', {H}, {W}) tensor matching x, got {_describe(concat)}"
                )
            extra = concat.shape[1]
        if C + extra != c.in_channels:
            what = f"x has {C} channels" + (f" and concat {extra}" if concat is not None else "")
            raise ConfigError(
                f"this UNet expects {c.in_channels} input channels; {what} (x shape {tuple(x.shape)})"
            )
        f = c.downsample_factor
        if H % f or W % f:
            raise ConfigError(
                f"x height and width must be multiples of {f} (2**(levels-1), levels={c.levels}), got {H}x{W}"
            )
        # a GroupNorm that sees one value per group has no variance: refuse inputs that small
        per_group = min(
            min(c.channels[max(level - 1, 0)], ch) // c.norm_groups * (H >> level) * (W >> level) * B
            for level, ch in enumerate(c.channels)
        )
        if per_group <= 1:
            raise ConfigError(
                f"x is too small: at {H}x{W} (batch {B}) a GroupNorm of this UNet sees one value per group; "
                f"use at least {2 * f}x{f} pixels"
            )

        if not isinstance(t, torch.Tensor):
            try:
                t = torch.tensor(t, device=x.device)
            except (TypeError, ValueError, RuntimeError):
                raise ConfigError(f"t must be a number or a 0-d / ({B},) tensor, got {t!r}") from None
        if (
            t.ndim > 1
            or (t.ndim == 1 and t.shape[0] not in (1, B))
            or t.is_complex()
            or t.dtype == torch.bool
        ):
            raise ConfigError(f"t must be a real 0-d or ({B},) tensor, got {_describe(t)}")
        t = t.to(x.device).reshape(-1).expand(B)

        if c.needs_context:
            D = c.cross_attention_dim
            if context is None:
                raise ConfigError(
                    f"context is required: this UNet cross-attends to tokens of width {D}; pass (B, L, {D})"
                )
            if (
                not isinstance(context, torch.Tensor)
                or context.ndim != 3
                or context.shape[-1] != D
                or context.shape[0] != B
            ):
                raise ConfigError(
                    f"context must be a ({B}, L, {D}) tensor (cross_attention_dim={D}), "
                    f"got {_describe(context)}"
                )
        elif context is not None:
            raise ConfigError("context was given but this UNet has no cross-attention; pass context=None")

        if c.num_classes is not None:
            n = c.num_classes
            if class_labels is None:
                raise ConfigError(f"class_labels is required: this UNet is class-conditional ({n} classes)")
            if (
                not isinstance(class_labels, torch.Tensor)
                or class_labels.shape != (B,)
                or class_labels.is_floating_point()
                or class_labels.is_complex()
            ):
                raise ConfigError(
                    f"class_labels must be an integer ({B},) tensor, got {_describe(class_labels)}"
                )
            if B and (int(class_labels.min()) < 0 or int(class_labels.max()) >= n):
                raise ConfigError(f"class_labels must be in [0, {n - 1}], got values {class_labels.tolist()}")
        elif class_labels is not None:
            raise ConfigError(
                "class_labels was given but this UNet is not class-conditional; pass class_labels=None"
            )
        return t


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:200]
