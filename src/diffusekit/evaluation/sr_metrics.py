"""Super-resolution metrics as pure tensor math: PSNR, SSIM and the consistency error.

* PSNR = 10 log10(R^2 / MSE) for images with value range R.
* SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural Similarity", eq. 13)
  with the paper's 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the window's weighted
  (population) moments, evaluated where the window fits inside the image (no padding), per channel, and
  averaged over positions and channels (the mean SSIM of the paper's sec. III-C).
* The consistency error of SR3 (Saharia et al. 2021, "Image Super-Resolution via Iterative Refinement",
  sec. 4.1): the MSE between the output downsampled by the scale factor and the low-resolution input; an
  upscaler whose outputs shrink back to its inputs scores 0.

Images are (B, C, H, W) tensors; every metric returns one value per image, float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusekit.errors import ConfigError

DOWNSAMPLE_MODES = ("area", "bicubic", "bilinear")


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise ConfigError(f"{name} must be a floating (B, C, H, W) tensor, got {getattr(t, 'shape', type(t))}")
    if x.shape != y.shape:
        raise ConfigError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ConfigError("x and y must be finite")
    return x.double(), y.double()


def _check_range(data_range: float) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, int | float) or not 0 < data_range < math.inf:
        raise ConfigError(f"data_range must be a positive finite number (1 for [0, 1] images), got {data_range!r}")
    return float(data_range)


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, 10 log10(data_range^2 / MSE); inf for identical images."""
    x, y = _check_pair(x, y)
    r = _check_range(data_range)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10 * torch.log10(r**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The normalised (size, size) Gaussian weighting window of SSIM (Wang et al. 2004, sec. III-C), float64."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ConfigError(f"window size must be a positive odd integer, got {size!r}")
    if not isinstance(sigma, int | float) or not 0 < sigma < math.inf:
        raise ConfigError(f"window sigma must be a positive finite number, got {sigma!r}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    w = g[:, None] * g[None, :]
    return w / w.sum()


def ssim(
    x: Tensor, y: Tensor, data_range: float = 1.0, *, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:  # fmt: skip
    """Mean structural similarity per image (Wang et al. 2004, eq. 13), in [-1, 1], 1 for identical images.

    At each position where the Gaussian window fits: mu, sigma^2 and sigma_xy are the window-weighted
    moments, and SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2
    + C2)) with C1 = (K1 R)^2, C2 = (K2 R)^2 (eq. 13, with the constants of eq. 7 and 9)."""
    x, y = _check_pair(x, y)
    r = _check_range(data_range)
    w = gaussian_window(window, sigma)
    b, c, h, wd = x.shape
    if h < window or wd < window:
        raise ConfigError(f"SSIM needs images of at least {window}x{window} pixels (its window), got {h}x{wd}")
    kernel = w.expand(c, 1, window, window)

    def blur(t: Tensor) -> Tensor:  # the window-weighted mean at every position where it fits
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))  # eq. 13
    return s.mean(dim=(1, 2, 3))


def consistency_error(output: Tensor, low_res: Tensor, mode: str = "area") -> Tensor:
    """MSE per image between ``output`` (B, C, s*h, s*w) downsampled to the size of ``low_res`` (B, C, h, w)
    and ``low_res`` (SR3, Saharia et al. 2021, sec. 4.1). ``mode``: how to downsample, ``area`` (the mean of
    each s x s block, the default), ``bicubic`` or ``bilinear`` (use the degradation the inputs were made
    with)."""
    if mode not in DOWNSAMPLE_MODES:
        raise ConfigError(f"mode must be one of {', '.join(DOWNSAMPLE_MODES)}, got {mode!r}")
    if not isinstance(output, Tensor) or not isinstance(low_res, Tensor) or output.ndim != 4 or low_res.ndim != 4:
        raise ConfigError("output and low_res must be (B, C, H, W) tensors")
    (b, c, h, w), (b2, c2, h2, w2) = output.shape, low_res.shape
    if (b, c) != (b2, c2) or h % h2 or w % w2 or h // h2 != w // w2:
        raise ConfigError(f"output {tuple(output.shape)} must be low_res {tuple(low_res.shape)} upscaled by one "
                          "integer factor")  # fmt: skip
    kwargs = {} if mode == "area" else {"align_corners": False, "antialias": True}
    down = F.interpolate(output.double(), size=(h2, w2), mode=mode, **kwargs)
    return (down - low_res.double()).pow(2).mean(dim=(1, 2, 3))


__all__ = ["DOWNSAMPLE_MODES", "consistency_error", "gaussian_window", "psnr", "ssim"]
