"""How much memory a training run needs, estimated before anything large is allocated.

A U-Net's training step keeps, for the backward pass, the output of (about) every layer of the forward pass.
``activation_bytes`` measures those outputs for one example by running the network on PyTorch's ``meta``
device (shapes only, no memory, no arithmetic); with the weights, their gradients, AdamW's two moments and
the EMA copy (5 float32 copies of the parameters) this is a lower bound of what a step needs, so a run that
cannot fit is refused up front with the numbers, instead of being killed by the OOM killer (or failing
after its first minutes) with a traceback.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNet, UNetConfig

PARAMETER_COPIES = 5  # weights, gradients, AdamW's exp_avg and exp_avg_sq, EMA


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device``: the GPU's total memory, or the machine's physical memory for the CPU
    (None where it cannot be found out)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def forward_activation_bytes(net: torch.nn.Module, forward: Callable[[torch.nn.Module], object]) -> int:
    """Bytes (float32) of the outputs of every leaf module of ``net`` (built on the ``meta`` device) while
    ``forward(net)`` runs on meta tensors: what a training step keeps for the backward pass."""
    total = 0

    def count(module: torch.nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        forward(net)
    finally:
        for h in hooks:
            h.remove()
    return total


def activation_bytes(config: UNetConfig, channels: int, resolution: int) -> tuple[int, int]:
    """(bytes of the float32 layer outputs one example's forward pass keeps for the backward pass, number of
    parameters) of the U-Net ``config``."""
    # class labels cannot be range-checked on the meta device; their embedding is one vector per example
    with torch.device("meta"):
        net = UNet(dataclasses.replace(config, num_classes=None))

    def forward(net: torch.nn.Module) -> None:
        x = torch.empty(1, channels, resolution, resolution, device="meta")  # (1, C, R, R)
        t = torch.zeros(1, dtype=torch.long, device="meta")
        # a text-conditioned network cross-attends to CLIP's 77 tokens (the longest context a caption gets)
        context = torch.empty(1, 77, config.cross_attention_dim, device="meta") if config.needs_context else None
        net(x, t, context=context)

    return forward_activation_bytes(net, forward), sum(p.numel() for p in net.parameters())


def check_training_memory(
    config: UNetConfig, *, channels: int, resolution: int, batch_size: int, device: torch.device
) -> int:
    """Refuse (ConfigError naming optim.batch_size and data.resolution) a micro-batch whose estimated memory
    exceeds ``device``'s; return the estimate in bytes."""
    per_example, n_params = activation_bytes(config, channels, resolution)
    return check_memory(per_example, n_params, resolution=resolution, batch_size=batch_size, device=device)


def check_memory(per_example: int, n_params: int, *, resolution: int, batch_size: int, device: torch.device) -> int:
    """Refuse (ConfigError naming optim.batch_size and data.resolution) a micro-batch of ``batch_size``
    examples of ``per_example`` activation bytes for a network of ``n_params`` parameters (PARAMETER_COPIES
    float32 copies) when it exceeds ``device``'s memory; return the estimate in bytes."""
    params = n_params * 4 * PARAMETER_COPIES
    need = params + batch_size * per_example
    have = device_memory_bytes(device)
    if have is not None and need > have:
        fit = max(0, (have - params) // max(1, per_example))
        raise ConfigError(
            f"optim.batch_size={batch_size} at data.resolution={resolution} needs about {_gib(need)} on {device} "
            f"({_gib(per_example)} of activations per image, {_gib(params)} of weights and optimizer state), "
            f"more than its {_gib(have)}; use a smaller optim.batch_size (at most about {fit} fit) with "
            "optim.grad_accum_steps for the same global batch, or a smaller data.resolution"
        )
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
