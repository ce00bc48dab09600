"""Trainable LoRA adapters on a Stable Diffusion pipeline (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

Each chosen Linear / Conv2d layer W of the U-Net (and, optionally, of the text encoders) gets a
:class:`~diffusekit.networks.lora.LoraTerm` with trainable A ("down", r x in) and B ("up", out x r) so that the
layer computes ``W x + (alpha / r) B A x`` (eq. 3); the base weights are frozen. As in the paper (sec. 4.1), A
starts random (uniform in +-1/sqrt(fan_in), the bound PyTorch's own Linear init and the reference trainers
use) and B at zero, so training starts from the base model exactly.

:class:`LoraNetwork` holds the terms as its only parameters (the pipeline is a plain attribute, not a
sub-module): its state dict, an optimiser over its parameters, its EMA copy and a DDP wrapper see the adapters
alone, and its ``forward`` is the whole conditioned prediction (text encoder(s) -> U-Net), so DDP synchronises
every adapter's gradient.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError
from diffusekit.networks import lora
from diffusekit.networks.attention import SpatialTransformer
from diffusekit.networks.layers import Conv2d, Linear
from diffusekit.networks.lora import LowRank
from diffusekit.pipelines.lora import components
from diffusekit.pipelines.sdxl import StableDiffusionXL
from diffusekit.pipelines.stable_diffusion import StableDiffusion

#: The name under which the trained adapter is attached while training.
ADAPTER_NAME = "train"
_ATTENTION_PROJECTION = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_LAYER = re.compile(r"^blocks\.(\d+)\.(attn\.(q|k|v|out)|mlp\.(fc1|fc2))$")


def unet_targets(unet: nn.Module, targets: str) -> list[str]:
    """The U-Net layers that get adapters (names in our modules), in module order: for ``attention`` the q/k/v/out
    projections of the transformer blocks' attentions; for ``transformer`` every Linear and 1x1 Conv2d inside
    the U-Net's transformer layers (:class:`SpatialTransformer`)."""
    if targets not in ("attention", "transformer"):
        raise ConfigError(f"lora.targets must be one of attention, transformer; got {targets!r}")
    names = []
    for prefix, block in unet.named_modules():
        if not isinstance(block, SpatialTransformer):
            continue
        for name, layer in block.named_modules():
            if not _adaptable(layer):
                continue
            if targets == "transformer" or _ATTENTION_PROJECTION.search(name):
                names.append(f"{prefix}.{name}")
    if not names:
        raise ConfigError("the U-Net has no transformer (cross-attention) layers to put LoRA adapters on")
    return names


def text_encoder_targets(encoder: nn.Module, *, skip_last: bool = False) -> list[str]:
    """The text encoder's attention projections and MLP layers (kohya's CLIPAttention and CLIPMLP modules).
    ``skip_last``: leave out the last layer, whose output the model does not read (SDXL's first encoder is
    used through its penultimate layer): an adapter there would get no gradient."""
    last = len(encoder.blocks) - 1
    names = []
    for name, layer in encoder.named_modules():
        m = _TEXT_LAYER.match(name)
        if m and _adaptable(layer) and not (skip_last and int(m.group(1)) == last):
            names.append(name)
    return names


def _adaptable(layer: nn.Module) -> bool:
    return isinstance(layer, Linear) or (isinstance(layer, Conv2d) and tuple(layer.kernel_size) == (1, 1))


def initial_update(layer: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> LowRank:
    """A fresh update for ``layer``: A uniform in +-1/sqrt(fan_in) (PyTorch's Linear/Conv2d default, kaiming
    uniform with a = sqrt(5)), B = 0 (Hu et al. 2021, sec. 4.1: the update starts at zero). float32, CPU."""
    if isinstance(layer, Conv2d):
        fan_in = layer.in_channels * math.prod(layer.kernel_size)
        down_shape: tuple[int, ...] = (rank, layer.in_channels, *layer.kernel_size)
        up_shape: tuple[int, ...] = (layer.out_channels, rank, 1, 1)
    else:
        fan_in = layer.in_features
        down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
    bound = 1.0 / math.sqrt(fan_in)
    down = (torch.rand(down_shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return LowRank(down.float(), torch.zeros(up_shape), float(alpha))


def plan_targets(sd: StableDiffusion, targets: str, train_text_encoder: bool) -> dict[str, list[str]]:
    """{component: layer names} that get adapters: the U-Net's ``targets`` and, with ``train_text_encoder``,
    each text encoder's attention and MLP layers (SDXL's first encoder without its unread last layer)."""
    parts = components(sd)
    plan = {"unet": unet_targets(parts["unet"], targets)}
    if train_text_encoder:
        xl = isinstance(sd, StableDiffusionXL)
        plan["text_encoder"] = text_encoder_targets(parts["text_encoder"], skip_last=xl)
        if xl:
            plan["text_encoder_2"] = text_encoder_targets(parts["text_encoder_2"])
    return plan


def _key(module: str) -> str:
    return module.replace(".", ":")  # sub-module names cannot contain "."


class LoraNetwork(nn.Module):
    """The trainable adapters of one pipeline and its conditioned prediction (module docstring).

    ``adapters[component][module name with ":" for "."]`` is the :class:`~diffusekit.networks.lora.LoraTerm`
    attached to that layer. Base weights are frozen here (``requires_grad_(False)``), and the base networks
    are put in eval mode (dropout off; it is off in the released models anyway)."""

    def __init__(self, sd: StableDiffusion, plan: dict[str, list[str]], *, rank: int, alpha: float,
                 seed: int) -> None:  # fmt: skip
        super().__init__()
        self.sd = sd  # a dataclass, not a module: its weights are not this module's parameters
        self.xl = isinstance(sd, StableDiffusionXL)
        parts = components(sd)
        for part in (*parts.values(), sd.codec.vae):
            part.requires_grad_(False).eval()
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict()
        for component, modules in plan.items():
            layers = dict(parts[component].named_modules())
            updates = {m: initial_update(layers[m], rank, alpha, generator) for m in modules}
            lora.attach(parts[component], ADAPTER_NAME, updates)
            terms = nn.ModuleDict()
            for module, _, term in lora.terms(parts[component], ADAPTER_NAME):
                term.down.requires_grad_(True)
                term.up.requires_grad_(True)
                terms[_key(module)] = term
            self.adapters[component] = terms
        self.train_text = any(c != "unet" for c in plan)

    def train(self, mode: bool = True) -> LoraNetwork:
        """Train mode for the adapters only; the base networks stay in eval mode."""
        self.training = mode
        return self

    def forward(self, x_t: Tensor, t: Tensor, prompts: Sequence[str], time_ids: Tensor | None = None) -> Tensor:
        """The U-Net's output (B, C, h, w) for noisy latents ``x_t`` at timesteps ``t`` (B,) conditioned on
        ``prompts`` as the pipeline does it: SD-1/2 the text encoder's last hidden states; SDXL both encoders'
        penultimate states, the pooled projection and the micro-conditioning ``time_ids`` (B, 6)."""
        sd = self.sd
        with torch.no_grad() if not self.train_text else contextlib.nullcontext():
            if self.xl:
                text = sd.encode(list(prompts))  # type: ignore[attr-defined]
                cond = {"context": text.context, "pooled": text.pooled, "time_ids": time_ids}
            else:
                cond = {"context": sd.encode_text(list(prompts))}
        return sd.unet(x_t, t, **cond)

    def updates(self, adapters: nn.ModuleDict | None = None) -> dict[str, dict[str, LowRank]]:
        """{component: {module: update}} of the adapters (of ``adapters``, an EMA copy of
        ``self.adapters``, when given), detached float32 CPU tensors: what a LoRA file stores."""
        source = self.adapters if adapters is None else adapters
        out: dict[str, dict[str, LowRank]] = {}
        for component, terms in source.items():
            out[component] = {
                key.replace(":", "."): LowRank(t.down.detach().float().cpu(), t.up.detach().float().cpu(), t.alpha)
                for key, t in terms.items()
            }
        return out

    def parameter_groups(self) -> Iterator[tuple[str, list[nn.Parameter]]]:
        """(component, its adapter parameters) for each adapted component."""
        for component, terms in self.adapters.items():
            yield component, [p for p in terms.parameters()]

    def detach_adapters(self) -> None:
        """Take the training adapters off the pipeline's networks (the pipeline is the base model again)."""
        parts = components(self.sd)
        for component in self.adapters:
            lora.detach(parts[component], ADAPTER_NAME)


__all__ = [
    "ADAPTER_NAME",
    "LoraNetwork",
    "initial_update",
    "plan_targets",
    "text_encoder_targets",
    "unet_targets",
]
