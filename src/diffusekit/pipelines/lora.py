"""LoRA adapters on a Stable Diffusion pipeline: its U-Net and text encoder(s) together (SDXL: both).

    sd = load_pipeline("model/")
    load_lora(sd, "style.safetensors", weight=0.8)          # kohya/A1111 or PEFT layout, told from the keys
    load_lora(sd, "detail.safetensors", weight=0.5)
    set_lora_weights(sd, {"style": 0.6}, scale=1.0)           # between generations, nothing reloaded
    fuse_lora(sd); ...; unfuse_lora(sd); remove_lora(sd, "detail")

The per-module rule (:mod:`diffusekit.networks.lora`): ``y = W x + b + sum_a scale * weight_a * (alpha_a / r_a)
B_a A_a x``; ``scale`` is the reference pipeline's ``lora_scale`` and applies to the U-Net and the text
encoders alike. A failed load leaves the pipeline as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from diffusekit.errors import ConfigError
from diffusekit.io.lora import read_lora, resolve, save_lora
from diffusekit.networks import lora
from diffusekit.pipelines.sdxl import StableDiffusionXL
from diffusekit.pipelines.stable_diffusion import StableDiffusion


def components(sd: StableDiffusion) -> dict[str, nn.Module]:
    """The networks a LoRA file may adapt, by the component names the files use: ``unet``, ``text_encoder``
    and, for SDXL, ``text_encoder_2`` (the OpenCLIP encoder; kohya ``lora_te2_``, PEFT ``text_encoder_2.``)."""
    parts: dict[str, nn.Module] = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    if isinstance(sd, StableDiffusionXL):
        parts["text_encoder_2"] = sd.text_encoder_2
    return parts


def load_lora(sd: StableDiffusion, path: str | os.PathLike, *, weight: float = 1.0, name: str | None = None) -> str:
    """Attach the LoRA file at ``path`` to ``sd`` with ``weight``, under ``name`` (default: the file's stem);
    returns the name. Every check (the file, its keys against the model, shapes, the name) runs before
    the pipeline changes; on any error it is unchanged."""
    name = Path(path).stem if name is None else name
    weight = lora.check_weight("weight", weight)
    if name in lora_weights(sd):
        raise ConfigError(f"a LoRA named {name!r} is already loaded; remove it first or pass another name")
    parts = components(sd)
    updates = resolve(read_lora(path), parts)
    scale = lora_scale(sd)
    done: list[nn.Module] = []
    try:
        for component, modules in updates.items():
            lora.attach(parts[component], name, modules, weight=weight, scale=scale)
            done.append(parts[component])
    except BaseException:
        for model in done:
            lora.detach(model, name)
        raise
    return name


def lora_weights(sd: StableDiffusion) -> dict[str, float]:
    """{name: weight} of the loaded LoRAs, in load order."""
    out: dict[str, float] = {}
    for model in components(sd).values():
        for n, w in lora.adapter_weights(model).items():
            out.setdefault(n, w)
    return out


def lora_scale(sd: StableDiffusion) -> float:
    """The global scale of the loaded LoRAs (1 when none is loaded)."""
    for model in components(sd).values():
        for _, _, term in lora.terms(model):
            return term.scale
    return 1.0


def set_lora_weights(sd: StableDiffusion, weights: Mapping[str, float] | None = None, *,
                     scale: float | None = None) -> None:  # fmt: skip
    """Change LoRA weights ({name: weight}) and/or the global ``scale`` for the next generations."""
    known = lora_weights(sd)
    unknown = [n for n in (weights or {}) if n not in known]
    if unknown:
        raise ConfigError(f"no LoRA named {unknown[0]!r} is loaded; loaded: {', '.join(known) or 'none'}")
    for model in components(sd).values():
        present = lora.adapter_weights(model)
        lora.set_weights(model, {n: w for n, w in (weights or {}).items() if n in present}, scale=scale)


def remove_lora(sd: StableDiffusion, name: str | None = None) -> None:
    """Remove LoRA ``name`` (default: all of them), taking fused updates out of the weights first."""
    known = lora_weights(sd)
    if name is not None and name not in known:
        raise ConfigError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(known) or 'none'}")
    for n in [name] if name is not None else list(known):
        for model in components(sd).values():
            if n in lora.adapter_weights(model):
                lora.detach(model, n)


def fuse_lora(sd: StableDiffusion) -> None:
    """Merge the loaded LoRAs into the U-Net's and text encoders' weights (generation then runs at the base
    model's speed); :func:`unfuse_lora` takes them out again."""
    for model in components(sd).values():
        lora.fuse(model)


def unfuse_lora(sd: StableDiffusion) -> None:
    """Take fused LoRA updates out of the weights (the base weights within float rounding)."""
    for model in components(sd).values():
        lora.unfuse(model)


def save_lora_file(sd: StableDiffusion, name: str, path: str | os.PathLike, *, format: str = "kohya") -> None:
    """Write the loaded LoRA ``name`` to ``path`` in the ``"kohya"`` or ``"peft"`` layout."""
    if name not in lora_weights(sd):
        raise ConfigError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(lora_weights(sd)) or 'none'}")
    updates = {
        component: {module: term.update() for module, _, term in lora.terms(model, name)}
        for component, model in components(sd).items()
    }
    save_lora({c: m for c, m in updates.items() if m}, path, format=format)


__all__ = [
    "components",
    "fuse_lora",
    "load_lora",
    "lora_scale",
    "lora_weights",
    "remove_lora",
    "save_lora_file",
    "set_lora_weights",
    "unfuse_lora",
]
