"""The layers whose arithmetic the runtime plan chooses: Conv2d, Linear, GroupNorm and LayerNorm.

Each is the PyTorch layer with two plain attributes that :func:`diffusekit.runtime.policy.prepare` sets and
``forward`` reads (parameter names, and so state-dict keys, are PyTorch's):

* ``compute_dtype``: ``None`` computes in the weights' dtype; ``torch.float32`` upcasts the input and the
  weights, computes in float32 and returns the input's dtype. On a CPU without native bfloat16 this gives
  the speed of float32 with the memory of bfloat16 storage.
* ``fast`` (Conv2d only): route the convolution through :func:`diffusekit.runtime.fastconv.conv2d`, which
  takes a Winograd or im2col path where it is faster and calls ``F.conv2d`` otherwise.

Conv2d and Linear also carry ``adapters``, a plain tuple of extra terms (LoRA, :mod:`diffusekit.networks.lora`)
that ``forward`` adds to the output while they are ``active``; empty unless adapters are attached, and not
part of the state dict. Terms that are modules follow the layer through every conversion ``nn.Module`` makes
with ``_apply`` (``.to(device / dtype / memory_format)``, ``.cuda()``, ``.half()``, ``.float()``, ...), as its
weight does, so an adapter lives where the weight it patches lives.

A network built from these layers runs exactly as PyTorch's layers until a plan says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.runtime import fastconv


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


class OutputTerm(Protocol):
    """An extra term of a layer's output, computed from the layer's (compute-dtype) input."""

    active: bool

    def __call__(self, x: Tensor) -> Tensor: ...


def _add_terms(y: Tensor, h: Tensor, adapters: tuple[OutputTerm, ...]) -> Tensor:
    for term in adapters:
        if term.active:
            y = y + term(h)
    return y


class _CarriesAdapters(nn.Module):
    """The ``adapters`` of a layer follow its conversions (module docstring): ``nn.Module`` converts a module's
    own tensors and its sub-modules' in ``_apply``; the terms are not sub-modules (the state dict stays the base
    model's), so they are converted here, in place like the layer's parameters."""

    adapters: tuple[OutputTerm, ...]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _CarriesAdapters:
        super()._apply(fn, recurse)
        for term in self.adapters:
            if isinstance(term, nn.Module):
                term._apply(fn, recurse)
        return self


class Conv2d(_CarriesAdapters, nn.Conv2d):
    """``nn.Conv2d`` with the plan's ``compute_dtype`` and ``fast`` switches and ``adapters`` (module
    docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_dtype: torch.dtype | None = None
        self.fast = False
        self.adapters: tuple[OutputTerm, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        weight, bias = _cast(self.weight, cd), _cast(self.bias, cd)
        h = _cast(x, cd)
        if self.fast and self.padding_mode == "zeros":
            y = fastconv.conv2d(h, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = self._conv_forward(h, weight, bias)
        return _add_terms(y, h, self.adapters).to(x.dtype)


class Linear(_CarriesAdapters, nn.Linear):
    """``nn.Linear`` with the plan's ``compute_dtype`` switch and ``adapters`` (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_dtype: torch.dtype | None = None
        self.adapters: tuple[OutputTerm, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        h = _cast(x, cd)
        y = F.linear(h, _cast(self.weight, cd), _cast(self.bias, cd))
        return _add_terms(y, h, self.adapters).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the plan's ``compute_dtype`` switch (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        y = F.group_norm(_cast(x, cd), self.num_groups, _cast(self.weight, cd), _cast(self.bias, cd), self.eps)
        return y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the plan's ``compute_dtype`` switch (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        cd = self.compute_dtype
        w, b = _cast(self.weight, cd), _cast(self.bias, cd)
        return F.layer_norm(_cast(x, cd), self.normalized_shape, w, b, self.eps).to(x.dtype)


#: The layer types a plan configures.
PLANNED_LAYERS = (Conv2d, Linear, GroupNorm, LayerNorm)
