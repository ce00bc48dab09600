"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", section 3 and Appendix G), the Stable Diffusion VAE.

An :class:`Encoder` maps an image in [-1, 1] to the parameters of a diagonal Gaussian posterior
q(z|x) (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"); a :class:`Decoder` maps latents back
to images. The latent scaling factor (0.18215 for SD-1.x) is stored in :class:`VAEConfig` only; this
module never applies it -- the pipeline codec does, in exactly one place.

``encode``/``decode`` accept ``tile=`` to process big inputs in overlapping tiles whose seams are
blended linearly, so memory stays bounded by the tile size (a 1024x1024 decode needs activations for
one tile at a time).

Module names follow the reference weight layout (``encoder.down_blocks.0.resnets.0.conv1``,
``quant_conv``), so a diffusers ``AutoencoderKL`` state dict loads as it is; its ``config.json`` is
translated to and from :class:`VAEConfig` at the boundary, in ``diffusekit.io.vae_config``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.limits import (
    MAX_LAYERS_PER_BLOCK,
    MAX_LEVELS,
    MAX_SAMPLE_SIZE,
    MAX_WIDTH,
    check_flag,
    check_float,
    check_int,
    translating,
)
from diffusekit.networks.attention import SpatialSelfAttention
from diffusekit.networks.blocks import DownLevel, MidBlock, UpLevel, init_weights
from diffusekit.networks.config_dict import config_from_dict, config_to_dict
from diffusekit.networks.layers import Conv2d, GroupNorm

VAE_NORM_EPS = 1e-6  # every GroupNorm of the LDM/SD autoencoder


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild an :class:`AutoencoderKL`. Saved beside the weights.

    Attributes:
        in_channels, out_channels: image channels.
        latent_channels: channels of the latent z.
        channels: feature channels per resolution level (encoder order, finest first); the image is
            downsampled 2x after every level but the last, so latents are ``2**(levels-1)`` times smaller.
        layers_per_block: residual blocks per encoder level (decoder levels have one more).
        norm_groups: GroupNorm groups (epsilon is always 1e-6).
        mid_attention: whether the bottlenecks have single-head self-attention.
        use_quant_conv, use_post_quant_conv: the 1x1 convolutions after the encoder / before the decoder.
        scaling_factor: the factor pipelines multiply latents by after encoding (and divide by before
            decoding) so that they have roughly unit variance; NOT applied by this network.
        shift_factor: subtracted before scaling by pipelines that use one (None = 0); not applied here.
        sample_size: image size the model was trained at (a hint; None = unknown).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        _check_sizes(self)
        for level, ch in enumerate(self.channels):
            if ch % self.norm_groups:
                raise ConfigError(
                    f"channels[{level}]={ch} is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    @translating("VAE config")
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return config_from_dict(cls, d)


def _check_sizes(c: VAEConfig) -> None:
    """Refuse sizes beyond ``diffusekit.limits``, values of the wrong type and non-finite floats, before any
    module is built (and before the shape checks do arithmetic on them)."""
    check_int("number of levels (channels)", len(c.channels), 1, MAX_LEVELS)
    for name in ("in_channels", "out_channels", "latent_channels"):
        check_int(name, getattr(c, name), 1, MAX_WIDTH)
    for level, ch in enumerate(c.channels):
        check_int(f"channels[{level}]", ch, 1, MAX_WIDTH)
    check_int("layers_per_block", c.layers_per_block, 1, MAX_LAYERS_PER_BLOCK)
    check_int("norm_groups", c.norm_groups, 1, MAX_WIDTH)
    if c.sample_size is not None:
        check_int("sample_size", c.sample_size, 1, MAX_SAMPLE_SIZE)
    check_float("scaling_factor", c.scaling_factor, 0.0, 1e6, open_low=True)
    if c.shift_factor is not None:
        check_float("shift_factor", c.shift_factor, -1e6, 1e6)
    for name in ("mid_attention", "use_quant_conv", "use_post_quant_conv"):
        check_flag(name, getattr(c, name))


#: Named presets (the registry of STYLE.md point 5).
VAE_PRESETS: dict[str, VAEConfig] = {
    # The Stable Diffusion 1.x/2.x VAE (f=8, 4 latent channels): ~83.7M parameters.
    "sd": VAEConfig(channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32, sample_size=512),
    # A tiny f=2 autoencoder for tests and demos.
    "tiny": VAEConfig(channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=32),
}


def _mid_attention(c: VAEConfig) -> Callable[[int], nn.Module] | None:
    if not c.mid_attention:
        return None
    return lambda ch: SpatialSelfAttention(ch, heads=1, norm_groups=c.norm_groups, norm_eps=VAE_NORM_EPS)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> posterior parameters (B, 2*latent, H/f, W/f) (before ``quant_conv``)."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        norm = dict(norm_groups=c.norm_groups, norm_eps=VAE_NORM_EPS)
        self.conv_in = Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        down, prev = [], c.channels[0]
        for level, ch in enumerate(c.channels):
            last = level == len(c.channels) - 1
            down.append(
                DownLevel(
                    prev,
                    ch,
                    num_layers=c.layers_per_block,
                    emb_dim=None,
                    downsample=not last,
                    asymmetric_pad=True,
                    **norm,
                )
            )
            prev = ch
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = MidBlock(prev, emb_dim=None, make_attention=_mid_attention(c), **norm)
        self.conv_norm_out = GroupNorm(c.norm_groups, prev, eps=VAE_NORM_EPS)
        self.conv_out = Conv2d(prev, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h, _ = block(h)  # (B, C_l, H/2^(l+1), W/2^(l+1)) except after the last level
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, latent, h, w) (after ``post_quant_conv``) -> image (B, out, h*f, w*f)."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        norm = dict(norm_groups=c.norm_groups, norm_eps=VAE_NORM_EPS)
        prev = c.channels[-1]
        self.conv_in = Conv2d(c.latent_channels, prev, 3, padding=1)
        self.mid_block = MidBlock(prev, emb_dim=None, make_attention=_mid_attention(c), **norm)
        up = []
        for level in reversed(range(len(c.channels))):
            ch = c.channels[level]
            up.append(
                UpLevel(
                    prev, ch, num_layers=c.layers_per_block + 1, emb_dim=None, upsample=level != 0, **norm
                )
            )
            prev = ch
        self.up_blocks = nn.ModuleList(up)  # up_blocks.0 is the deepest level
        self.conv_norm_out = GroupNorm(c.norm_groups, prev, eps=VAE_NORM_EPS)
        self.conv_out = Conv2d(prev, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = self.mid_block(h)  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # 2x larger after every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, h*f, w*f)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014).

    ``parameters`` is the raw encoder output (B, 2*latent, h, w): mean first, then log-variance
    (unclamped). ``logvar`` is clamped to [-30, 20] for numerical safety.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters  # (B, 2*latent, h, w)
        self.mean, logvar = parameters.chunk(2, dim=1)  # (B, latent, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(
        self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``mean + std * noise``; ``noise`` defaults to a standard-normal draw from ``generator``."""
        if noise is None:
            noise = torch.randn(
                self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
            )
        elif noise.shape != self.mean.shape:
            raise ConfigError(
                f"noise must have the latent shape {tuple(self.mean.shape)}, got {tuple(noise.shape)}"
            )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per batch item, summed over latent dimensions (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    Images are in [-1, 1]. Latents are the encoder's raw scale: the config's ``scaling_factor`` is not
    applied here.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        n = c.latent_channels
        self.quant_conv = Conv2d(2 * n, 2 * n, 1) if c.use_quant_conv else None
        self.post_quant_conv = Conv2d(n, n, 1) if c.use_post_quant_conv else None
        init_weights(self)

    # ---- whole-tensor paths -----------------------------------------------------------------------------
    def _posterior_parameters(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)  # (B, 2*latent, h, w)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (B, latent, h, w)
        return self.decoder(z)  # (B, out, h*f, w*f)

    # ---- public API ---------------------------------------------------------------------------------------
    def encode(
        self, x: torch.Tensor, *, tile: int | None = None, tile_overlap: int | None = None
    ) -> DiagonalGaussian:
        """Posterior of images ``x`` (B, in_channels, H, W) in [-1, 1]; H and W multiples of f.

        ``tile``: process ``tile`` x ``tile`` pixel tiles (multiple of f) overlapping by ``tile_overlap``
        pixels (default tile // 4, rounded to a multiple of f), blending the posterior parameters linearly.
        """
        c, f = self.config, self.config.downsample_factor
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ConfigError(f"x must be a (B, {c.in_channels}, H, W) image tensor, got {_describe(x)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ConfigError(f"x height and width must be multiples of {f}, got {x.shape[2]}x{x.shape[3]}")
        if tile is None:
            return DiagonalGaussian(self._posterior_parameters(x))
        tile, overlap = _check_tile(tile, tile_overlap, multiple=f)
        params = tiled_map(self._posterior_parameters, x, tile=tile, overlap=overlap, up=1, down=f)
        return DiagonalGaussian(params)

    def decode(
        self, z: torch.Tensor, *, tile: int | None = None, tile_overlap: int | None = None
    ) -> torch.Tensor:
        """Images (B, out_channels, h*f, w*f) from latents ``z`` (B, latent_channels, h, w), unscaled.

        ``tile``: decode ``tile`` x ``tile`` latent tiles overlapping by ``tile_overlap`` latent pixels
        (default tile // 4) and blend the overlaps linearly; memory is bounded by the tile size.
        """
        c = self.config
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != c.latent_channels:
            raise ConfigError(f"z must be a (B, {c.latent_channels}, h, w) latent tensor, got {_describe(z)}")
        if tile is None:
            return self._decode(z)
        tile, overlap = _check_tile(tile, tile_overlap, multiple=1)
        return tiled_map(self._decode, z, tile=tile, overlap=overlap, up=c.downsample_factor, down=1)

    def forward(
        self, x: torch.Tensor, *, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reconstruction ``decode(encode(x).sample())`` (or of the posterior mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mean
        return self.decode(z)


def _check_tile(tile: Any, overlap: Any, *, multiple: int) -> tuple[int, int]:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < multiple or tile % multiple:
        raise ConfigError(f"tile must be a positive multiple of {multiple}, got {tile!r}")
    if overlap is None:
        overlap = tile // 4 // multiple * multiple
    if (
        isinstance(overlap, bool)
        or not isinstance(overlap, int)
        or not 0 <= overlap < tile
        or overlap % multiple
    ):
        raise ConfigError(
            f"tile_overlap must be a multiple of {multiple} in [0, tile={tile}), got {overlap!r}"
        )
    return tile, overlap


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size); the last one ends at ``size``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, ramp: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """Per-position blend weight of a tile of length ``n``: rising linearly over its first ``ramp``
    positions (if it has a neighbour before it) and falling over its last ``ramp`` (if one after)."""
    w = torch.ones(n, device=device)
    if ramp > 0:
        pos = torch.arange(n, device=device, dtype=torch.float32) + 0.5
        if rise:
            w = torch.minimum(w, pos / ramp)
        if fall:
            w = torch.minimum(w, (n - pos) / ramp)
    return w


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    up: int = 1,
    down: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` windows of ``x`` (B, C, H, W) and blend the results.

    ``fn`` maps a (B, C, h, w) window to (B, C', h*up/down, w*up/down). In each overlap the two tiles'
    outputs are mixed with linear weights that rise from ~0 to 1 across the overlap, normalised so the
    weights sum to one everywhere: a pointwise ``fn`` is reproduced exactly, and a local one without seams.
    Only one tile's activations exist at a time.
    """
    B, _, H, W = x.shape
    stride = tile - overlap
    ys, xs = _tile_starts(H, tile, stride), _tile_starts(W, tile, stride)
    ramp = overlap * up // down
    out = weight = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            y = fn(x[:, :, y0 : y0 + tile, x0 : x0 + tile])  # (B, C', th, tw)
            if out is None:
                out = y.new_zeros(B, y.shape[1], H * up // down, W * up // down)
                weight = y.new_zeros(1, 1, H * up // down, W * up // down)
            th, tw = y.shape[2], y.shape[3]
            want = (min(tile, H - y0) * up // down, min(tile, W - x0) * up // down)
            if (th, tw) != want:
                raise ValueError(f"tiled_map: fn returned a {th}x{tw} tile, expected {want[0]}x{want[1]}")
            wy = _ramp(th, ramp, rise=i > 0, fall=i < len(ys) - 1, device=y.device)
            wx = _ramp(tw, ramp, rise=j > 0, fall=j < len(xs) - 1, device=y.device)
            w = (wy[:, None] * wx[None, :]).to(y.dtype)  # (th, tw)
            oy, ox = y0 * up // down, x0 * up // down
            out[:, :, oy : oy + th, ox : ox + tw] += y * w
            weight[:, :, oy : oy + th, ox : ox + tw] += w
    return out / weight


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:200]
