"""Faster 3x3 convolutions for float32 inference on the CPU: Winograd F(4x4, 3x3) and one-matrix-product
(im2col) convolution, each taken only at the sizes where it beats oneDNN's direct convolution.

**Winograd.** A 3x3 convolution computes each output pixel with 9 multiply-adds per input channel.
Winograd's minimal filtering algorithm, as applied to convolutional networks by Lavin & Gray ("Fast
Algorithms for Convolutional Neural Networks", CVPR 2016), computes a 4x4 output tile from a 6x6 input tile
with 36 multiplications instead of 144:

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                                      (Lavin & Gray, eq. 8)

and, summed over input channels, the element-wise products become 36 independent matrix products, one per
position (xi, nu) of the 6x6 transformed tile (their eq. 10-12):

    M[xi,nu] = V[xi,nu] @ U[xi,nu],   V = B^T d B (tiles x C_in),   U = G g G^T (C_in x C_out).

The 4x fewer multiplications cost three linear transforms (input tiles, filters, outputs) that move memory,
so the path wins for wide layers with many tiles (see :func:`choose`). The transformed
filters ``U`` are computed per call (2 * 36 * 9 FLOPs per filter entry, a few percent of the matrix products
at the sizes where this path is used), so no second copy of the weights is kept. The F(4x4, 3x3) transforms
with interpolation points 0, +-1, +-2 and infinity (Lavin & Gray, section 4.2) lose about one decimal digit
against the direct convolution in float32 (relative error ~1e-5).

**One matrix product (im2col).** For very wide layers on few pixels (Stable Diffusion's 1280-2560 channels
at 8x8-16x16 latents) oneDNN's direct convolution runs well below the matrix-multiply peak. There the 3x3
neighbourhoods are gathered into a (pixels, 9 * C_in) matrix, ordered (ky, kx, c) so that the gather copies
whole channel runs and a channels-last weight (C_out, 3, 3, C_in) is already that matrix's partner, and one
``addmm`` does the rest. Exact up to summation order.

Measured on a 2-core AVX2 CPU (benchmarks/README.md): Winograd 1.3-2x faster than the direct convolution for
256-640 channels at 32x32-256x256 pixels, im2col 2x faster for 1280-2560 channels at 8x8. Both paths are
taken only for float32 on the CPU; in training (gradients needed) Winograd also computes the input and weight
gradients (the latter by the transpose of the forward algorithm, :func:`winograd_weight_grad`). Everything
else runs ``F.conv2d``. Those size rules (:func:`size_rule`) were fitted on one CPU: for inference,
:mod:`diffusekit.runtime.autotune` times the paths once per layer shape on the machine at hand and keeps the
fastest, with the size rules as its fallback (``DIFFUSEKIT_AUTOTUNE=rules`` pins them).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from diffusekit.runtime import autotune

# F(4x4, 3x3): output tile m = 4, filter r = 3, input tile a = m + r - 1 = 6 (Lavin & Gray, section 4.2).
_M, _A = 4, 6
_BT = ((4, 0, -5, 0, 1, 0),
       (0, -4, -4, 1, 1, 0),
       (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0),
       (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))  # fmt: skip
_G = ((1 / 4, 0, 0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0, 0, 1))  # fmt: skip
_AT = ((1, 1, 1, 1, 1, 0),
       (0, 1, -1, 2, -2, 0),
       (0, 1, 1, 4, 4, 0),
       (0, 1, -1, 8, -8, 1))  # fmt: skip

#: Where the Winograd path is faster than oneDNN's direct convolution on the machines measured
#: (benchmarks/README.md): at least MIN_CHANNELS channels in and out, at least MIN_TILE_CHANNELS
#: tiles x min(C_in, C_out) (the size of one transformed matrix product), and at least
#: MIN_TILES_PER_OUT_CHANNEL tiles per output channel: the transformed filters (36 * C_in * C_out values,
#: written anew each call) must not outweigh the transformed tiles (36 * tiles * C_in).
MIN_CHANNELS = 128
MIN_TILE_CHANNELS = 32768
MIN_TILES_PER_OUT_CHANNEL = 0.25
#: The im2col path: at least this many input channels, at most this many output pixels (N * H * W).
GEMM_MIN_CHANNELS = 1024
GEMM_MAX_PIXELS = 128
#: The im2col path is a measured candidate (:func:`candidates`) only while its gathered (pixels, 9 * C_in)
#: matrix is at most this large.
GEMM_MAX_COLUMN_BYTES = 64 << 20
#: Set this environment variable to 0 to turn both fast paths off everywhere (every convolution then runs
#: ``F.conv2d``, bit for bit what PyTorch computes). It is read once, when this module is imported, into
#: :data:`ENABLED`.
ENV_SWITCH = "DIFFUSEKIT_FAST_CONV"
ENABLED = os.environ.get(ENV_SWITCH, "1") != "0"
#: Bytes of transformed input tiles processed at once: bounds the extra memory to a few times this plus the
#: transformed filters, and keeps a chunk's work in cache.
CHUNK_BYTES = 8 << 20


@functools.cache
def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kronecker products B^T (x) B^T (36x36), G (x) G (36x9) and A^T (x) A^T (16x36): with 2-D tiles flattened
    row-major, B^T d B is (B^T (x) B^T) vec(d), and likewise for G and A. Made once per dtype and device,
    outside inference mode so that training may use them too."""
    with torch.inference_mode(False):
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
        return tuple(torch.kron(m, m).to(dtype=dtype, device=device) for m in (bt, g, at))  # type: ignore[return-value]


def _grid(h: int, w: int) -> tuple[int, int]:
    """Rows and columns of 4x4 output tiles covering an h x w image (the last ones partial)."""
    return -(-h // _M), -(-w // _M)


def tiles(x: torch.Tensor) -> int:
    """Number of 4x4 output tiles of a 3x3 'same' convolution of ``x`` (N, C, H, W)."""
    th, tw = _grid(x.shape[2], x.shape[3])
    return x.shape[0] * th * tw


def _check_weight(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape[2:] != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: weight must be (C_out, {x.shape[1]}, 3, 3), got {tuple(weight.shape)}")


def _needs_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _pair(v: tuple[int, ...] | int | str) -> tuple[int, ...] | str:
    return v if isinstance(v, (tuple, str)) else (v, v)


def choose(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 1,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> str | None:
    """Which fast path computes this convolution: ``"winograd"``, ``"gemm"`` or ``None`` (the direct
    convolution). Only float32 CPU 3x3 convolutions with stride 1, padding 1 and no dilation or groups qualify,
    and none when :data:`ENABLED` is false (the environment variable ``DIFFUSEKIT_FAST_CONV=0`` at start-up).
    Without gradients the process's :class:`~diffusekit.runtime.autotune.Tuner` picks among the paths by
    measurement where that matters; otherwise, and as its fallback, :func:`size_rule` decides."""
    if not ENABLED or not qualifies(x, weight, stride, padding, dilation, groups):
        return None
    rule = size_rule(x, weight)
    if _needs_grad(x, weight):
        return rule
    picked = autotune.current().pick(x, weight, rule or autotune.DIRECT, candidates(x, weight))
    return None if picked == autotune.DIRECT else picked


def qualifies(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 1,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> bool:
    """Whether a fast path can compute this convolution at all: float32 on the CPU, a 3x3 kernel, stride 1,
    'same' padding, no dilation or groups (whatever its size)."""
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if tuple(weight.shape[2:]) != (3, 3) or groups != 1 or x.shape[1] != weight.shape[1]:
        return False
    return _pair(stride) == (1, 1) and _pair(padding) in ((1, 1), "same") and _pair(dilation) == (1, 1)


def size_rule(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The path the sizes say is fastest for a 3x3 'same' convolution that qualifies (see :func:`choose`),
    as fitted on the machines of benchmarks/README.md (:data:`MIN_CHANNELS`, :data:`MIN_TILE_CHANNELS`,
    :data:`MIN_TILES_PER_OUT_CHANNEL`, :data:`GEMM_MIN_CHANNELS`, :data:`GEMM_MAX_PIXELS`); ``"gemm"`` only
    when no gradient is needed."""
    n, c, h, w = x.shape
    if c >= GEMM_MIN_CHANNELS and n * h * w <= GEMM_MAX_PIXELS and not _needs_grad(x, weight):
        return "gemm"
    co = weight.shape[0]
    t, narrow = tiles(x), min(c, co)
    if narrow >= MIN_CHANNELS and t * narrow >= MIN_TILE_CHANNELS and t >= co * MIN_TILES_PER_OUT_CHANNEL:
        return "winograd"
    return None


def candidates(x: torch.Tensor, weight: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The paths that can compute ``F.conv2d(x, weight, padding=1)`` (a qualifying convolution, see
    :func:`choose`), each as a call for :mod:`~diffusekit.runtime.autotune` to time; im2col only while its
    gathered matrix stays under :data:`GEMM_MAX_COLUMN_BYTES`."""
    paths: dict[str, Callable[[], torch.Tensor]] = {
        autotune.DIRECT: lambda: F.conv2d(x, weight, None, 1, 1),
        "winograd": lambda: winograd_conv3x3(x, weight),
    }
    n, c, h, w = x.shape
    if n * h * w * 9 * c * x.element_size() <= GEMM_MAX_COLUMN_BYTES:
        paths["gemm"] = lambda: gemm_conv3x3(x, weight)
    return paths


def _chunks(n: int, th: int, tw: int, channels: int, element_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Chunks (first image, images, first tile row, tile rows) of the tile grid: whole images when they are
    small, bands of one image when not, each with about :data:`CHUNK_BYTES` of transformed tiles."""
    rows = max(1, CHUNK_BYTES // (_A * _A * tw * channels * element_size))
    per, rows = max(1, rows // th), min(rows, th)
    for i in range(0, n, per):
        for r in range(0, th, rows):
            yield i, min(per, n - i), r, min(rows, th - r)


def _transformed_tiles(x: torch.Tensor, co: int, bb: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For each chunk of the 4x4 output tile grid of a 3x3 'same' convolution of ``x`` (N, C, H, W):
    (first image, first tile row, V) with V = B^T d B of its 6x6 zero-padded input tiles, shaped
    (36, images, tile rows, tiles per row, C)."""
    n, c, h, w = x.shape
    th, tw = _grid(h, w)
    xh = x.permute(0, 2, 3, 1)  # NHWC view
    wp = _M * tw + 2
    for i, ni, r, k in _chunks(n, th, tw, max(c, co), x.element_size()):
        # The zero-padded input rows of these tiles (padded row j is input row j - 1); only borders are zeroed.
        lo, hi = _M * r - 1, _M * (r + k) + 1  # input rows [lo, hi) -> slab rows [0, 4k + 2)
        a, b = max(lo, 0), min(hi, h)
        slab = x.new_empty((ni, _M * k + 2, wp, c))
        slab[:, : a - lo].zero_()
        slab[:, b - lo :].zero_()
        slab[:, :, :1].zero_()
        slab[:, :, w + 1 :].zero_()
        slab[:, a - lo : b - lo, 1 : w + 1].copy_(xh[i : i + ni, a:b])
        d = slab.unfold(1, _A, _M).unfold(2, _A, _M)  # (ni, k, tw, C, 6, 6), overlapping views
        d = d.permute(4, 5, 0, 1, 2, 3).reshape(_A * _A, ni * k * tw * c)  # gather: (36, tiles * C)
        yield i, r, (bb @ d).view(_A * _A, ni, k, tw, c)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` (C_out, C_in, 3, 3), computed with
    Winograd's F(4x4, 3x3) (Lavin & Gray 2016, eq. 8-12). ``x`` is (N, C_in, H, W) in any memory format;
    the result is (N, C_out, H, W) in channels-last memory. Autograd through this function works but keeps
    every intermediate; :func:`conv2d` trains through a custom backward instead."""
    _check_weight("winograd_conv3x3", x, weight)
    bb, gg, aa = _transforms(x.dtype, x.device)
    n, c, h, w = x.shape
    co = weight.shape[0]
    th, tw = _grid(h, w)

    # U = G g G^T for every (C_in, C_out) pair: (36, C_in, C_out).
    u = (gg @ weight.reshape(co, c, 9).permute(2, 1, 0).reshape(9, c * co)).view(_A * _A, c, co)

    out = x.new_empty((n, _M * th, _M * tw, co))
    out_tiles = out.view(n, th, _M, tw, _M, co)
    for i, r, v in _transformed_tiles(x, co, bb):
        ni, k, p = v.shape[1], v.shape[2], v.shape[1] * v.shape[2] * tw
        m = torch.bmm(v.view(_A * _A, p, c), u)  # (36, tiles, C_out)
        y = (aa @ m.view(_A * _A, p * co)).view(_M, _M, ni, k, tw, co)
        y = y.permute(2, 3, 0, 4, 1, 5)  # (ni, k, 4, tw, 4, C_out)
        if bias is None:
            out_tiles[i : i + ni, r : r + k].copy_(y)
        else:
            torch.add(y, bias, out=out_tiles[i : i + ni, r : r + k])
    if _M * th != h or _M * tw != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def winograd_weight_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``y = F.conv2d(x, weight, padding=1)`` for a 3x3 weight, given ``dy`` = dL/dy,
    by the transpose of the Winograd forward pass: with the tiles flattened, vec(y) = (A^T (x) A^T)(U ⊙ V)
    and U = (G (x) G) vec(g), so dL/dg = (G (x) G)^T sum_tiles V ⊙ ((A^T (x) A^T)^T vec(dy)) -- per transform
    position one matrix product over the tiles, (C_in x tiles) @ (tiles x C_out). Returns (C_out, C_in, 3, 3)."""
    bb, gg, aa = _transforms(x.dtype, x.device)
    n, c, h, w = x.shape
    co = dy.shape[1]
    _, tw = _grid(h, w)
    dyh = dy.permute(0, 2, 3, 1)  # NHWC view
    s = x.new_zeros((_A * _A, c, co))
    for i, r, v in _transformed_tiles(x, co, bb):
        ni, k = v.shape[1], v.shape[2]
        p = ni * k * tw
        # dy tiles of this chunk, zero beyond the image: (16, tiles * C_out)
        g = dy.new_zeros((ni, _M * k, _M * tw, co))
        rows = min(_M * (r + k), h) - _M * r
        g[:, :rows, :w].copy_(dyh[i : i + ni, _M * r : _M * r + rows])
        g = g.view(ni, k, _M, tw, _M, co).permute(2, 4, 0, 1, 3, 5).reshape(_M * _M, p * co)
        z = (aa.t() @ g).view(_A * _A, p, co)  # (A^T (x) A^T)^T vec(dy)
        s.baddbmm_(v.view(_A * _A, p, c).transpose(1, 2), z)
    return (gg.t() @ s.view(_A * _A, c * co)).view(3, 3, c, co).permute(3, 2, 0, 1)


def gemm_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` as one matrix product of the gathered
    3x3 neighbourhoods (im2col, ordered (ky, kx, c)) with the weight seen as (C_out, 9 * C_in). Result in
    channels-last memory. Meant for few pixels and many channels (see :func:`choose`)."""
    _check_weight("gemm_conv3x3", x, weight)
    n, c, h, w = x.shape
    co = weight.shape[0]
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (N, H+2, W+2, C)
    cols = xp.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)
    wk = weight.permute(0, 2, 3, 1).reshape(co, 9 * c)  # a view for channels-last weights
    y = cols @ wk.t() if bias is None else torch.addmm(bias, cols, wk.t())
    return y.view(n, h, w, co).permute(0, 3, 1, 2)


class _WinogradConv3x3(torch.autograd.Function):
    """Winograd forward pass, input gradient and weight gradient. For y = conv(x, W, padding=1) the input
    gradient is the 'same' convolution of dy with W transposed in its channels and flipped in space, itself a
    3x3 convolution that takes the fast path; the weight gradient is :func:`winograd_weight_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return winograd_conv3x3(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w_t = weight.transpose(0, 1).flip(2, 3)
            with torch.no_grad():
                dx = conv2d(dy, w_t, None, 1, 1)
        if ctx.needs_input_grad[1]:
            dw = winograd_weight_grad(x, dy).contiguous(memory_format=torch.channels_last)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, ...] | int = 1,
    padding: tuple[int, ...] | int | str = 0,
    dilation: tuple[int, ...] | int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` that takes a fast path (:func:`winograd_conv3x3`, :func:`gemm_conv3x3`) where
    :func:`choose` says it is faster; with gradients, the Winograd path also computes both gradients."""
    path = choose(x, weight, stride, padding, dilation, groups)
    if path == "winograd":
        if _needs_grad(x, weight):
            return _WinogradConv3x3.apply(x, weight, bias)
        return winograd_conv3x3(x, weight, bias)
    if path == "gemm":
        return gemm_conv3x3(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
