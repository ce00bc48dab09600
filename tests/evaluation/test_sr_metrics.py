"""PSNR, SSIM and the SR3 consistency error against closed forms and an independent, loop-by-loop SSIM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusekit.errors import ConfigError
from diffusekit.evaluation.sr_metrics import consistency_error, psnr, ssim


def _images(seed: int, shape=(2, 3, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_closed_form():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)  # the closed forms are for exact values
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert psnr(x * 255, x * 255 + 25.5, data_range=255).item() == pytest.approx(20.0, abs=1e-9)
    assert psnr(x, x + 0.01).item() == pytest.approx(40.0, abs=1e-9)
    assert math.isinf(psnr(x, x).item())


def _naive_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Eq. 13 of Wang et al. 2004 written out position by position (an oracle for the vectorised version)."""
    c1, c2 = 0.01**2, 0.03**2
    half = (size - 1) / 2
    g = [math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(size)]
    total = sum(a * b for a in g for b in g)
    values = []
    for ch in range(x.shape[0]):
        for top in range(x.shape[1] - size + 1):
            for left in range(x.shape[2] - size + 1):
                mx = my = sxx = syy = sxy = 0.0
                for i in range(size):
                    for j in range(size):
                        wt = g[i] * g[j] / total
                        a, b = float(x[ch, top + i, left + j]), float(y[ch, top + i, left + j])
                        mx, my = mx + wt * a, my + wt * b
                        sxx, syy, sxy = sxx + wt * a * a, syy + wt * b * b, sxy + wt * a * b
                vx, vy, cov = sxx - mx * mx, syy - my * my, sxy - mx * my
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


def test_ssim_matches_eq_13_computed_position_by_position():
    x = _images(0, (1, 2, 13, 14))
    y = (x + 0.2 * _images(1, (1, 2, 13, 14))).clamp(0, 1)
    assert ssim(x, y).item() == pytest.approx(_naive_ssim(x[0], y[0]), abs=1e-9)


def test_ssim_closed_forms():
    x = _images(2)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    # constant images a and b: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    full = dict(size=(1, 1, 12, 12), dtype=torch.float64)
    got = ssim(torch.full(fill_value=a, **full), torch.full(fill_value=b, **full)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)
    assert ssim(x, 1 - x).mean() < 0  # an inverted image is anti-correlated


def test_metrics_fall_as_noise_grows_and_ssim_is_symmetric():
    x = _images(3)
    noise = _images(4) - 0.5
    psnrs = [psnr(x, x + s * noise).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    ssims = [ssim(x, x + s * noise).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert psnrs == sorted(psnrs, reverse=True) and ssims == sorted(ssims, reverse=True)
    y = x + 0.1 * noise
    torch.testing.assert_close(ssim(x, y), ssim(y, x))


def test_consistency_error():
    low = _images(5, (2, 3, 6, 6))
    up = F.interpolate(low, scale_factor=4, mode="nearest")  # shrinks back to the input exactly
    torch.testing.assert_close(consistency_error(up, low), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(consistency_error(up + 0.1, low), torch.full((2,), 0.01, dtype=torch.float64))
    assert (consistency_error(up.flip(-1), low) > 1e-3).all()  # a mirrored output does not shrink to its input
    assert consistency_error(up, low, mode="bicubic").shape == (2,)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9)), "same shape"),
        (lambda: psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)), r"\(B, C, H, W\)"),
        (lambda: psnr(torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), math.nan)), "finite"),
        (lambda: psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), data_range=0), "data_range"),
        (lambda: ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)), "at least 11x11"),
        (lambda: ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), window=4), "odd"),
        (lambda: consistency_error(torch.zeros(1, 3, 10, 10), torch.zeros(1, 3, 4, 4)), "one integer factor"),
        (lambda: consistency_error(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), mode="nearest"), "mode"),
    ],
)
def test_bad_arguments_are_config_errors(call, expected):
    with pytest.raises(ConfigError, match=expected):
        call()
