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

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.networks.layers import PLANNED_LAYERS, Conv2d
from diffusekit.runtime.memory import release_freed_memory

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
        return _cpu_native_bf16()
    return False


def _cpu_native_bf16() -> bool:
    """bfloat16 instructions in this CPU (AVX512-BF16 or AMX), asked of PyTorch's own CPUID probes; the
    /proc/cpuinfo flags only where this torch has no probes. (oneDNN's ``_is_mkldnn_bf16_supported`` is not
    this test: it also says yes on AVX-512 CPUs without them, where it emulates bfloat16 and float32 is
    faster.)"""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        return any(p is not None and p() for p in probes)
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def default_device(local_rank: int = 0) -> torch.device:
    """The process's CUDA device when CUDA is available (``local_rank`` picks one under DDP), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_device(name: str = "auto", *, option: str = "--device", local_rank: int = 0) -> torch.device:
    """The device a user named: ``auto`` (:func:`default_device`), ``cpu``, ``cuda`` or ``cuda:N``. A name
    that is not a device, or CUDA where none is available, is a ConfigError naming ``option``."""
    if name == "auto":
        return default_device(local_rank)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {name}: no CUDA device is available; use {option} cpu")
    return device


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


def autoencoder_plan(plan: Plan, device: str | torch.device, dtype: torch.dtype = torch.float32) -> Plan:
    """The plan for an autoencoder beside a network run under ``plan``: ``dtype`` (float32: the VAE of a pipeline
    always decodes in float32), never compiled, and channels-last only on the CPU. On CUDA the decoder's
    GroupNorms at 256-512 px are the cost, and PyTorch's channels-last GroupNorm is the slow path there: on an
    H200 (torch 2.11) the SD VAE decode took 28.1 / 32.2 ms (bfloat16 / float32) channels-last against
    22.8 / 28.0 ms contiguous, the reference 23.9 / 28.8 ms (benchmarks/gpu_layout.py)."""
    return dataclasses.replace(
        plan, dtype=dtype, compile=False, channels_last=plan.channels_last and torch.device(device).type == "cpu"
    )


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
    release_freed_memory()  # the weights' former copies (layout, dtype, device), kept by the C heap otherwise
    return model


# ---- the plan's switches on the layers of networks.layers -----------------------------------------------------
def use_float32_compute(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every planned layer of ``model`` (:data:`diffusekit.networks.layers.PLANNED_LAYERS`: Conv2d,
    Linear, GroupNorm, LayerNorm) compute in float32 whatever its storage dtype, returning results in the
    input's dtype; gradients still reach the stored parameters. ``enabled=False`` goes back to computing in
    the weights' dtype. Layers of other types are left alone."""
    for m in model.modules():
        if isinstance(m, PLANNED_LAYERS):
            m.compute_dtype = torch.float32 if enabled else None
    return model


def use_native_compute(model: nn.Module) -> nn.Module:
    """Undo :func:`use_float32_compute` (fast convolutions, if on, stay on)."""
    return use_float32_compute(model, enabled=False)


def use_fast_conv(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let every 3x3 :class:`diffusekit.networks.layers.Conv2d` of ``model`` take the Winograd or im2col path
    of :mod:`diffusekit.runtime.fastconv` on calls where it is faster (float32 on the CPU, at the sizes
    :func:`~diffusekit.runtime.fastconv.choose` accepts); other calls run the usual convolution. Composes
    with :func:`use_float32_compute`. ``enabled=False`` undoes it."""
    for m in model.modules():
        if isinstance(m, Conv2d) and m.kernel_size == (3, 3):
            m.fast = enabled
    return model
