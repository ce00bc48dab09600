"""The autocast dtype of a training run (``run.mixed_precision``) on its device."""

from __future__ import annotations

import torch

from diffusekit.errors import ConfigError
from diffusekit.runtime.policy import native_bf16


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for run.mixed_precision on ``device`` (None = float32)."""
    if name == "no":
        return None
    if device.type == "cuda":
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if name == "bf16" else torch.float16
    if name == "fp16":
        raise ConfigError("run.mixed_precision='fp16' needs a CUDA GPU; on CPU use 'bf16' or 'no'")
    if name == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16("cpu") else None
