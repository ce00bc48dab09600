"""State-dict key names: ours <-> the reference (diffusers) layout.

Our module trees (``networks/unet.py``, ``networks/vae.py``) use the reference's module names, so the
current reference layout needs no renaming at all. The only renames are for older reference files,
kept here in one place:

* Spatial self-attention written before the reference's 0.14 release (e.g. the DDPM CIFAR-10 port,
  early Stable Diffusion VAEs) names its projections ``query`` / ``key`` / ``value`` / ``proj_attn``;
  they are ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` now. Some converters also stored these
  projections as 1x1 convolutions ``(C, C, 1, 1)``; they are linear layers ``(C, C)``.

The single-file Stable Diffusion (CompVis layout) converter composes its own mapping with these.
"""

from __future__ import annotations

import re

import torch

_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# spatial self-attention projections (not the transformer blocks' attn1/attn2, which are always linear)
_SPATIAL_PROJECTION = re.compile(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def from_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference (diffusers) key names -> ours, accepting the legacy attention names listed above."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _LEGACY_ATTENTION.match(key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}"
        if value.ndim == 4 and value.shape[2:] == (1, 1) and _SPATIAL_PROJECTION.match(key):
            value = value[:, :, 0, 0]  # a 1x1 conv stored for what is a linear layer
        out[key] = value
    return out


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> the current reference layout (identical names; a shallow copy)."""
    return dict(state)
