"""Guidance: classifier-free (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6) and autoguidance
(Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 2), optionally limited to an
interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models")."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffusekit.errors import ConfigError

Network = Callable[..., Tensor]  # network(x, t, **conditioning) -> raw output
Gate = Callable[[Tensor], bool]  # network time t -> apply guidance at this call?


def guided(
    network: Network,
    guidance_scale: float,
    uncond: dict[str, Tensor],
    cond: dict[str, Tensor],
    *,
    gate: Gate | None = None,
) -> Network:
    """A model(x, t) that evaluates ``network`` with and without conditioning and mixes the outputs:
    out = out_uncond + s (out_cond - out_uncond).

    Both halves go through the network as one doubled batch [uncond; cond]. ``guidance_scale`` == 1
    means no guidance: the network is called once, with ``cond`` only. Conditioning tensors are
    batch-first; per-call extras (e.g. inpainting channels) can be passed to the returned model.
    ``gate`` (see :func:`interval_gate`) decides per call from the network time whether to guide; where it says
    no, the call is the conditional half alone (one network evaluation instead of two).
    """
    plain = _conditional(network, guidance_scale, cond)
    if guidance_scale == 1.0:  # (s < 1 interpolates toward the unconditional output: still two halves)
        return plain
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model(x: Tensor, t: Tensor, **extra: Tensor) -> Tensor:
        if gate is not None and not gate(t):
            return plain(x, t, **extra)
        doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = network(torch.cat([x, x]), t, **both, **doubled)  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)
        return _mix(out_uncond, out_cond, guidance_scale)

    return model


def autoguided(
    network: Network,
    guide: Network,
    guidance_scale: float,
    cond: dict[str, Tensor],
    *,
    guide_cond: dict[str, Tensor] | None = None,
    gate: Gate | None = None,
) -> Network:
    """Autoguidance (Karras et al. 2024, eq. 2): out = out_guide + s (out - out_guide), where ``guide`` is a weaker
    version of ``network`` with the same conditioning and parametrization (e.g. an earlier EMA of the same
    training run, sec. 3): extrapolating away from its errors improves the samples without the loss of diversity
    of classifier-free guidance, and works for unconditional models too. Both networks see ``cond`` unless
    ``guide_cond`` is given: the guide's own conditioning, e.g. the "no class" label, which makes the guide weak in
    both of the ways eq. 2 can extrapolate from (an earlier model, and an unconditional one as in classifier-free
    guidance, Ho & Salimans 2022 eq. 6). Mixing raw outputs is mixing denoisers, since every parametrization here is
    affine in the output with coefficients of x and sigma only. ``guidance_scale`` == 1 is ``network`` alone;
    ``gate`` as in :func:`guided`.
    """
    plain = _conditional(network, guidance_scale, cond)
    if guidance_scale == 1.0:
        return plain
    weak = cond if guide_cond is None else guide_cond

    def model(x: Tensor, t: Tensor, **extra: Tensor) -> Tensor:
        out = plain(x, t, **extra)
        if gate is not None and not gate(t):
            return out
        return _mix(guide(x, t, **weak, **extra), out, guidance_scale)

    return model


def _conditional(network: Network, guidance_scale: float, cond: dict[str, Tensor]) -> Network:
    """``network`` with ``cond`` bound (what both kinds of guidance return at scale 1 and call outside their gate),
    after checking the scale."""
    if not guidance_scale >= 0:
        raise ConfigError(f"guidance_scale must be >= 0, got {guidance_scale!r}")

    def plain(x: Tensor, t: Tensor, **extra: Tensor) -> Tensor:
        return network(x, t, **cond, **extra)

    return plain


def _mix(weak: Tensor, strong: Tensor, scale: float) -> Tensor:
    """weak + s (strong - weak): eq. 6 of Ho & Salimans 2022 (weak = unconditional) and eq. 2 of Karras et al.
    2024 (weak = the guiding model)."""
    return weak + scale * (strong - weak)


def check_guidance_interval(interval: Sequence[float] | None, name: str = "guidance_interval") -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi <= inf, or a ConfigError naming ``name``; None means every level, (0, inf)."""
    if interval is None:
        return 0.0, math.inf
    try:
        lo, hi = (_level(v) for v in interval)
    except (TypeError, ValueError, OverflowError):  # not two numbers: "12" and "0.28" are text, True, 10**400 no float
        shown = repr(interval) if len(repr(interval)) <= 80 else repr(interval)[:77] + "..."
        raise ConfigError(f"{name} must be two noise levels LO,HI (sigma, e.g. 0.28,5), got {shown}") from None
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ConfigError(f"{name} must satisfy 0 <= LO < HI (noise levels sigma), got {lo:g},{hi:g}")
    return lo, hi


def _level(value: object) -> float:
    """A noise level given as a real number (a bool or a string is not one: a TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(value)
    return float(value)


def interval_gate(sigma_at: Callable[[Tensor], float], interval: Sequence[float] | None) -> Gate | None:
    """The gate that guides only where lo < sigma(t) <= hi (Kynkäänniemi et al. 2024, sec. 3: guidance at high
    noise levels pulls the samples of a class toward a few modes and costs diversity, at low levels it does
    next to nothing). ``sigma_at`` maps a network time to its noise level (``SamplerConfig.sigma_map()``;
    ``SamplerConfig.guidance_gate`` builds this gate); the
    interval is in the variance-exploding sigma of Karras et al. 2022 (the paper's EDM2 settings: (0.28, 2.9]
    on ImageNet-512 latents). None: no gate (guidance at every level)."""
    if interval is None:
        return None
    lo, hi = check_guidance_interval(interval)
    return lambda t: lo < sigma_at(t) <= hi
