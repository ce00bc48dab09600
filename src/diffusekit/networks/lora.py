"""LoRA adapters on a network's Linear and Conv2d layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", eq. (3)): a frozen weight W gets a low-rank update, ``h = W x + (alpha / r) B A x``,
A (r x in) the "down" and B (out x r) the "up" projection. For a convolution (LoCon), A is a convolution
with the target's kernel, stride, padding and dilation and B a 1x1 convolution, so the merged kernel is
``W + (alpha / r) einsum("or,rikl->oikl", B, A)``.

Each adapted layer holds its terms in its plain ``adapters`` tuple (:mod:`diffusekit.networks.layers`), which
its ``forward`` adds to the output: ``y = W x + b + sum_a weight_a * scale * (alpha_a / r_a) B_a (A_a x)``,
``weight_a`` the adapter's weight and ``scale`` the global one. Adapter tensors are not parameters of the
network (its state dict is the base model's); the terms are :class:`torch.nn.Module` s of their own, so
training can hand their parameters to an optimiser.

Functions here work on one network: :func:`attach` (all checks first, then the change), :func:`detach`,
:func:`set_weights`, :func:`fuse` / :func:`unfuse` (add the updates into the weights and back, within float
rounding), :func:`adapter_weights`. File formats live in :mod:`diffusekit.io.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.limits import check_float
from diffusekit.networks.layers import Conv2d, Linear

MAX_WEIGHT = 1e4  # |adapter weight| and |scale| beyond this are refused (A1111 users type -2..2)
ADAPTED_LAYERS = (Linear, Conv2d)


@dataclass(frozen=True)
class LowRank:
    """One module's update as a file stores it: ``down`` = A (r, in[, kh, kw]), ``up`` = B (out, r[, 1, 1]),
    ``alpha`` (the update is scaled by alpha / r)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (LoRA eq. (3))."""
        return self.alpha / self.rank

    def weight_delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(alpha / r) B A shaped like the target's weight: (out, in) or (out, in, kh, kw)."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if down.ndim == 2:
            return self.scale * (up @ down)
        return self.scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def fitted(layer: nn.Module, update: LowRank) -> LowRank:
    """``update`` shaped for ``layer`` (a 1x1 convolution's update given as 2-D matrices, or a Linear's as
    1x1 kernels, is reshaped), or a WeightsError saying which shape does not fit. Checks: a finite
    ``alpha`` > 0, A and B with one rank, A's input and B's output sizes and A's kernel against the layer."""
    down, up = update.down, update.up
    if not (isinstance(update.alpha, float | int) and math.isfinite(update.alpha) and update.alpha > 0):
        raise WeightsError(f"alpha must be a finite number > 0, got {update.alpha!r}")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise WeightsError(f"down/up weights must be floating point, got {down.dtype} and {up.dtype}")
    if isinstance(layer, Conv2d):
        kernel = tuple(layer.kernel_size)
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise WeightsError(f"convolution with groups={layer.groups}, padding_mode={layer.padding_mode!r} "
                               "takes no adapter")  # fmt: skip
        if kernel == (1, 1):
            down = down[:, :, None, None] if down.ndim == 2 else down
        up = up[:, :, None, None] if up.ndim == 2 else up
        want_down = (down.shape[0] if down.ndim else 0, layer.in_channels, *kernel)
        want_up = (layer.out_channels, want_down[0], 1, 1)
    elif isinstance(layer, Linear):
        if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
            down = down[:, :, 0, 0]
        if up.ndim == 4 and tuple(up.shape[2:]) == (1, 1):
            up = up[:, :, 0, 0]
        want_down = (down.shape[0] if down.ndim else 0, layer.in_features)
        want_up = (layer.out_features, want_down[0])
    else:
        raise WeightsError(f"a {type(layer).__name__} takes no adapter (only Linear and Conv2d layers do)")
    if want_down[0] < 1 or tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise WeightsError(
            f"shapes down {tuple(update.down.shape)}, up {tuple(update.up.shape)} do not fit the layer "
            f"(expected down {want_down}, up {want_up} for a rank-r update of {_layer_shape(layer)})"
        )
    return LowRank(down, up, float(update.alpha))


def _layer_shape(layer: nn.Module) -> str:
    return f"{type(layer).__name__} with weight {tuple(layer.weight.shape)}"


class LoraTerm(nn.Module):
    """One adapter on one layer: what the layer's ``forward`` adds to its output while ``active``."""

    def __init__(self, name: str, update: LowRank, layer: nn.Module, weight: float, scale: float) -> None:
        super().__init__()
        self.name = name
        self.alpha = update.alpha
        w = layer.weight
        self.down = nn.Parameter(update.down.detach().to(w.device, w.dtype).clone(), requires_grad=False)
        self.up = nn.Parameter(update.up.detach().to(w.device, w.dtype).clone(), requires_grad=False)
        self.conv = None
        if isinstance(layer, Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
        self.weight = weight  # this adapter's weight
        self.scale = scale  # the global scale, the same for every adapter of a network
        self.fused = False  # True while the update is merged into the layer's weight

    @property
    def multiplier(self) -> float:
        """weight x scale x alpha / r: the factor of B A x."""
        return self.weight * self.scale * self.alpha / self.down.shape[0]

    @property
    def active(self) -> bool:
        """Whether ``forward`` must add this term (not merged into the weight, and not zero)."""
        return not self.fused and self.multiplier != 0.0

    def update(self) -> LowRank:
        """This term's update as a file stores it (A, B, alpha)."""
        return LowRank(self.down.detach(), self.up.detach(), self.alpha)

    def weight_delta(self) -> Tensor:
        """multiplier x B A in float32, shaped like the layer's weight."""
        return self.update().weight_delta() * (self.weight * self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """multiplier x B (A x), in ``x``'s dtype (the layer's compute dtype)."""
        down, up = self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype)
        if self.conv is None:
            h = F.linear(F.linear(x, down), up)  # (..., out)
        else:
            h = F.conv2d(F.conv2d(x, down, None, **self.conv), up)  # (B, out, H', W')
        return h * self.multiplier


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, ADAPTED_LAYERS):
            yield name, module


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """{adapter name: its weight} for the adapters attached to ``model``, in the order they were attached."""
    out: dict[str, float] = {}
    for _, layer in _layers(model):
        for term in layer.adapters:
            out.setdefault(term.name, term.weight)
    return out


def terms(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Module, LoraTerm]]:
    """(layer name, layer, term) for every term on ``model`` (of adapter ``name`` when given)."""
    for layer_name, layer in _layers(model):
        for term in layer.adapters:
            if name is None or term.name == name:
                yield layer_name, layer, term


def check_weight(name: str, value: object) -> float:
    """An adapter weight or scale: a finite number with |value| <= MAX_WEIGHT (negative weights subtract an
    adapter, as the popular UIs allow)."""
    return check_float(name, value, -MAX_WEIGHT, MAX_WEIGHT)


def check_updates(model: nn.Module, updates: Mapping[str, LowRank]) -> dict[str, LowRank]:
    """``updates`` (our module name -> update) fitted to ``model``'s layers; a WeightsError naming the
    first module that does not exist, takes no adapter or whose shapes do not fit. Changes nothing."""
    layers = dict(_layers(model))
    out = {}
    for module, update in updates.items():
        layer = layers.get(module)
        if layer is None:
            kind = "no such module" if module not in dict(model.named_modules()) else "not a Linear or Conv2d layer"
            raise WeightsError(f"module {module!r}: {kind}")
        try:
            out[module] = fitted(layer, update)
        except WeightsError as e:
            raise WeightsError(f"module {module!r}: {e}") from None
    return out


def attach(
    model: nn.Module, name: str, updates: Mapping[str, LowRank], *, weight: float = 1.0, scale: float | None = None
) -> None:
    """Attach adapter ``name`` (our module name -> update) to ``model`` with ``weight``. ``scale``: the
    global scale (default: the one the model's adapters already have, else 1). Every check runs before
    anything changes, so on an error the model is as it was."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
    weight = check_weight("adapter weight", weight)
    existing = adapter_weights(model)
    if name in existing:
        raise ConfigError(f"an adapter named {name!r} is already attached; remove it first or pick another name")
    if scale is None:
        scale = next((t.scale for _, _, t in terms(model)), 1.0)
    scale = check_weight("lora scale", scale)
    fitted_updates = check_updates(model, updates)
    layers = dict(_layers(model))
    new = {module: LoraTerm(name, u, layers[module], weight, scale) for module, u in fitted_updates.items()}
    for module, term in new.items():  # nothing below raises: the model changes all at once
        layers[module].adapters = (*layers[module].adapters, term)


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` (taking its update out of the weights first if fused)."""
    found = False
    for _, layer, term in list(terms(model, name)):
        found = True
        if term.fused:
            _unmerge(layer, term)
        layer.adapters = tuple(t for t in layer.adapters if t is not term)
    if not found:
        raise ConfigError(f"no adapter named {name!r}; attached: {', '.join(adapter_weights(model)) or 'none'}")


def set_weights(model: nn.Module, weights: Mapping[str, float] | None = None, *, scale: float | None = None) -> None:
    """Change adapter weights ({name: weight}) and/or the global ``scale`` without reloading anything. A fused
    adapter's merged update is replaced by the one of its new weight."""
    weights = dict(weights or {})
    known = adapter_weights(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r}; attached: {', '.join(known) or 'none'}")
    weights = {n: check_weight(f"weight of adapter {n!r}", w) for n, w in weights.items()}
    if scale is not None:
        scale = check_weight("lora scale", scale)
    for _, layer, term in terms(model):
        new_weight = weights.get(term.name, term.weight)
        new_scale = term.scale if scale is None else scale
        if new_weight == term.weight and new_scale == term.scale:
            continue
        fused = term.fused
        if fused:
            _unmerge(layer, term)
        term.weight, term.scale = new_weight, new_scale
        if fused:
            _merge(layer, term)


def fuse(model: nn.Module) -> None:
    """Merge every attached, unfused adapter into its layer's weight (``W += multiplier B A``); the
    layers then run at the speed of the base model. :func:`unfuse` takes the updates out again."""
    for _, layer, term in terms(model):
        if not term.fused:
            _merge(layer, term)


def unfuse(model: nn.Module) -> None:
    """Take every fused update out of its layer's weight (the base weight within float rounding); the
    adapters stay attached and are added at run time again."""
    for _, layer, term in terms(model):
        if term.fused:
            _unmerge(layer, term)


def _add_to_weight(layer: nn.Module, delta: Tensor) -> None:
    w = layer.weight
    with torch.inference_mode(w.is_inference()), torch.no_grad():
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


def _merge(layer: nn.Module, term: LoraTerm) -> None:
    _add_to_weight(layer, term.weight_delta())
    term.fused = True


def _unmerge(layer: nn.Module, term: LoraTerm) -> None:
    _add_to_weight(layer, -term.weight_delta())
    term.fused = False


__all__ = [
    "ADAPTED_LAYERS",
    "MAX_WEIGHT",
    "LoraTerm",
    "LowRank",
    "adapter_weights",
    "attach",
    "check_updates",
    "check_weight",
    "detach",
    "fitted",
    "fuse",
    "set_weights",
    "terms",
    "unfuse",
]
