"""How a model should run on this machine, decided once and applied in one place.

* **dtype**: bfloat16 where the hardware does bfloat16 arithmetic natively (CUDA GPUs that support it; CPUs
  with AVX512-BF16 or AMX), float32 elsewhere. On a CPU without those instructions PyTorch's bfloat16 matrix
  products and convolutions are emulated and run tens to hundreds of times slower than float32.
* **float32 compute for bfloat16 storage**: when a model is kept in bfloat16 on such a CPU (to halve its
  memory), :func:`prepare` makes its convolutions, linear layers and normalisations compute in float32 and
  round the result back to bfloat16: the speed of float32 with the memory of bfloat16.
* **channels-last** 4-D weights, so that convolutions, GroupNorm and the token views of attention work on
  NHWC activations without reorders.
* **inference**: eval mode and no parameter gradients.
* **faster 3x3 convolutions** on the CPU (:mod:`diffusekit.runtime.fastconv`): Winograd F(4x4, 3x3) for
  wide layers with many pixels, one matrix product for very wide layers on few pixels.
* **torch.compile**: opt-in only (it costs minutes of compilation on a small CPU).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.runtime import fastconv

#: CPU flags (as /proc/cpuinfo spells them) that give native bfloat16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware (so bfloat16 is faster, not slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the device computes it natively, float32 elsewhere."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


@dataclass(frozen=True)
class Plan:
    """What :func:`prepare` does to a model. ``None`` fields are decided from the device."""

    dtype: torch.dtype | None = None
    channels_last: bool = True
    float32_compute: bool | None = None  # None: on for bfloat16/float16 models on CPUs without native bf16
    compile: bool = False
    fast_conv: bool | None = None  # None: on for the CPU unless compiling (runtime.fastconv decides per call)
    inference: bool = True  # eval mode and no parameter gradients; False: train mode, gradients on


def prepare(model: nn.Module, plan: Plan | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """Move ``model`` to ``device`` and apply ``plan`` (dtype, layout, float32 compute, mode); returns it."""
    plan = plan or Plan()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = plan.dtype or default_dtype(device)
    if plan.inference:
        model.eval().requires_grad_(False)
    else:
        model.train().requires_grad_(True)
    model.to(device=device, dtype=dtype)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    f32 = plan.float32_compute
    if f32 is None:
        f32 = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not native_bf16(device)
    if f32:
        use_float32_compute(model)
    # not under torch.compile by default: inductor picks its own convolution kernels
    fast_conv = plan.fast_conv if plan.fast_conv is not None else device.type == "cpu" and not plan.compile
    if fast_conv:
        use_fast_conv(model)
    if plan.compile:
        model.compile()
    return model


# ---- float32 compute for half-precision storage ---------------------------------------------------------------
def _conv2d(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if self.__dict__.get("_fast_conv", False) and self.padding_mode == "zeros":
        return fastconv.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
    return self._conv_forward(x, weight, bias)


def _conv2d_f32(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return _conv2d(self, x.float(), self.weight.float(), bias).to(x.dtype)


def _conv2d_native(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _conv2d(self, x, self.weight, self.bias)


def _linear_f32(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def _group_norm_f32(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    w = None if self.weight is None else self.weight.float()
    b = None if self.bias is None else self.bias.float()
    return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _layer_norm_f32(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    w = None if self.weight is None else self.weight.float()
    b = None if self.bias is None else self.bias.float()
    return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


_FLOAT32_FORWARDS = {
    nn.Conv2d: _conv2d_f32,
    nn.Linear: _linear_f32,
    nn.GroupNorm: _group_norm_f32,
    nn.LayerNorm: _layer_norm_f32,
}


def use_float32_compute(model: nn.Module) -> nn.Module:
    """Make every Conv2d, Linear, GroupNorm and LayerNorm of ``model`` compute in float32 whatever its
    storage dtype, returning results in the input's dtype. Gradients still reach the stored parameters.
    Undo with :func:`use_native_compute`."""
    for m in model.modules():
        forward = _FLOAT32_FORWARDS.get(type(m))
        if forward is not None:
            m.forward = types.MethodType(forward, m)
    return model


def use_native_compute(model: nn.Module) -> nn.Module:
    """Undo :func:`use_float32_compute` (fast convolutions, if on, stay on)."""
    for m in model.modules():
        if type(m) in _FLOAT32_FORWARDS and "forward" in m.__dict__:
            del m.forward
            if m.__dict__.get("_fast_conv", False):
                m.forward = types.MethodType(_conv2d_native, m)
    return model


# ---- faster 3x3 convolutions ------------------------------------------------------------------------------------
def use_fast_conv(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let every 3x3 ``nn.Conv2d`` of ``model`` take the Winograd or im2col path of
    :mod:`diffusekit.runtime.fastconv` on calls where it is faster (float32 on the CPU, at the sizes
    :func:`~diffusekit.runtime.fastconv.choose` accepts); other calls run the usual convolution. Composes
    with :func:`use_float32_compute`. ``enabled=False`` undoes it."""
    for m in model.modules():
        if type(m) is not nn.Conv2d or m.kernel_size != (3, 3):
            continue
        m._fast_conv = enabled
        if "forward" not in m.__dict__ and enabled:
            m.forward = types.MethodType(_conv2d_native, m)
        elif not enabled and m.__dict__.get("forward") is not None and m.forward.__func__ is _conv2d_native:
            del m.forward
    return model
