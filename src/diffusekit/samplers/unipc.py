"""UniPC-2: the unified predictor-corrector multistep solver of the data-prediction ODE.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models":
UniP-p (predictor) and UniC-p (corrector) for the data prediction m = x0_hat, with B(h) = e^h - 1 (the
"bh2" choice) and order p <= 2. With alpha = sqrt(abar), s = sqrt(1 - abar), lambda = log(alpha / s),
h = lambda' - lambda and phi = e^{-h} - 1:
    UniP-1:  x' = (s' / s) x - alpha' phi m                       (= DPM-Solver++ 1 / DDIM)
    UniP-2:  x' = UniP-1 - alpha' B(h) / 2 * (m_prev - m) / r,       r = (lambda_prev - lambda) / h
    UniC-p:  after the network has been evaluated at x', the same step is redone from the previous corrected
             sample with the new evaluation m' as one more difference: coefficients rho solve
             sum_i rho_i r_i^(j-1) = j! (phi / (-h)^j - ...) / B(h), j = 1..p (Zhao et al. 2023, the
             phi_k recursion phi_{k+1} = phi_k / (-h) - 1 / k!).
The corrector adds no network call: N steps cost N calls. The network is evaluated at the predicted (not
the corrected) sample, and the last step, to clean data, returns m.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from diffusekit.diffusion.grids import Grid
from diffusekit.samplers.common import Denoiser, StepInfo, time_input


def _level(abar: float) -> tuple[float, float, float]:
    """(alpha, s, lambda) of a noise level abar."""
    alpha, s = abar**0.5, (1 - abar) ** 0.5
    return alpha, s, math.log(alpha) - math.log(s)


def _correct(
    x_c: Tensor, prev: tuple[float, float, float], now: tuple[float, float, float], ms: list[Tensor],
    lam_2: float | None, m: Tensor, order: int,
) -> Tensor:  # fmt: skip
    """UniC-p (B(h) = e^h - 1): redo the step prev -> now from the corrected sample x_c with the new data
    prediction m. ``ms`` = [m_{k-2}, m_{k-1}] (the last p), ``lam_2`` = lambda_{k-2}."""
    _, s_p, lam_p = prev
    alpha, s, lam = now
    h = lam - lam_p
    phi = math.expm1(-h)  # = B(h) for bh2
    m_p = ms[-1]
    base = (s / s_p) * x_c - (alpha * phi) * m_p  # UniP-1 from the corrected sample
    d_t = m - m_p
    if order == 1:
        return base - (alpha * phi * 0.5) * d_t  # rho = 1/2
    r = (lam_2 - lam_p) / h
    g1 = phi / -h - 1  # phi_2 (times h): h phi_1 / (-h) - 1
    g2 = g1 / -h - 0.5  # phi_3: phi_2 / (-h) - 1/2!
    b1, b2 = g1 / phi, 2 * g2 / phi
    rho0 = (b1 - b2) / (1 - r)  # solve [[1, 1], [r, 1]] rho = [b1, b2]
    rho1 = b1 - rho0
    return base - (alpha * phi) * (rho0 * (ms[-2] - m_p) / r + rho1 * d_t)


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run UniPC-2 (bh2) along ``grid`` on the variance-preserving sample; the order is 1 at the first and the
    last step ("lower_order_final"), 2 elsewhere."""
    n = len(grid)
    ms: list[Tensor] = []  # the last two data predictions
    lams: list[float] = []  # their lambdas
    prev: tuple[float, float, float] | None = None  # (alpha, s, lambda) of the previous step's start
    x_c = x  # the corrected sample the predictor starts from
    order = 1
    for k in range(n):
        a_t = float(grid.alphas_cumprod[k])
        now = _level(a_t)
        m = denoiser(x, time_input(grid.timesteps, k), a_t, cond).x0  # at the predicted sample
        if prev is not None:
            x_c = _correct(x_c, prev, now, ms, lams[-2] if len(lams) > 1 else None, m, order)  # UniC
        else:
            x_c = x
        ms, lams = (ms + [m])[-2:], (lams + [now[2]])[-2:]
        order = min(2, n - k, len(ms))
        a_next = float(grid.alphas_cumprod_next[k])
        if a_next >= 1.0:
            x = m  # lambda' = inf: phi = -1, alpha' = 1, s' = 0
        else:
            alpha_n, s_n, lam_n = _level(a_next)
            h = lam_n - now[2]
            phi = math.expm1(-h)  # = B(h) for bh2
            x = (s_n / now[1]) * x_c - (alpha_n * phi) * m  # UniP-1
            if order == 2:
                r = (lams[-2] - now[2]) / h
                x = x - (alpha_n * phi * 0.5 / r) * (ms[-2] - m)  # UniP-2
        prev = now
        if callback is not None:
            callback(StepInfo(k, float(grid.timesteps[k]), x, m))
    return x
