"""Load and save U-Net and VAE model folders in the reference (diffusers) layout:
``config.json`` + ``diffusion_pytorch_model.safetensors`` (or a sharded ``.safetensors.index.json``).

Saved folders always carry the reference ``config.json`` (written by ``unet_to_diffusers`` /
``vae_to_diffusers``), so they load in
the reference implementation as well as here. Loading is strict: missing, unexpected or mis-shaped
tensors raise :class:`~diffusekit.errors.WeightsError` naming the files and a few offending keys.
Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.diffusers_keys import from_diffusers_state_dict, to_diffusers_state_dict
from diffusekit.io.unet_config import unet_from_diffusers, unet_to_diffusers
from diffusekit.io.vae_config import vae_from_diffusers, vae_to_diffusers
from diffusekit.io.weights import load_weights, missing_weights, read_json, save_weights, write_json
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "from_diffusers_state_dict",
    "load_unet",
    "load_vae",
    "save_unet",
    "save_vae",
    "to_diffusers_state_dict",
]

M = TypeVar("M", bound=nn.Module)


def load_unet(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> UNet:
    """Load a ``UNet2DModel`` / ``UNet2DConditionModel`` folder (or a pipeline folder with ``unet/``).

    ``dtype`` casts floating tensors (None keeps the file's dtype); ``variant`` picks
    ``diffusion_pytorch_model.<variant>.safetensors`` (e.g. "fp16"). Returns the model in eval mode.
    """
    return _load(folder, "unet", unet_from_diffusers, UNet, dtype=dtype, device=device, variant=variant)


def load_vae(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    variant: str | None = None,
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``); see :func:`load_unet`."""
    return _load(
        folder, "vae", vae_from_diffusers, AutoencoderKL, dtype=dtype, device=device, variant=variant
    )


def save_unet(model: UNet, folder: str | os.PathLike) -> None:
    """Write ``config.json`` (reference format) and ``diffusion_pytorch_model.safetensors``."""
    _save(model, unet_to_diffusers(model.config), folder)


def save_vae(model: AutoencoderKL, folder: str | os.PathLike) -> None:
    """Write ``config.json`` (reference format, incl. ``scaling_factor``) and the safetensors weights."""
    _save(model, vae_to_diffusers(model.config), folder)


# ---- shared machinery ----------------------------------------------------------------------------------


def _save(model: nn.Module, config: dict, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    state = to_diffusers_state_dict(model.state_dict())
    save_weights(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json({**config, "_written_by": "diffusekit"}, folder / CONFIG_NAME)


def _load(
    folder: str | os.PathLike,
    component: str,
    parse_config: Callable[[dict], object],
    build: Callable[[object], M],
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    variant: str | None,
) -> M:
    folder = Path(folder)
    if folder.is_file():
        raise WeightsError(f"{folder}: is a file; a {component} folder (or a model folder holding {component}/) "
                           "was expected")  # fmt: skip
    if not folder.is_dir():
        raise WeightsError(f"{component} folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file() and (folder / component / CONFIG_NAME).is_file():
        folder = folder / component  # a whole pipeline folder was given
    config_path = folder / CONFIG_NAME
    try:
        config = parse_config(read_json(config_path))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None

    files = _weight_files(folder, variant)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_weights(path))
    state = from_diffusers_state_dict(state)
    where = files[0] if len(files) == 1 else folder / f"{WEIGHTS_NAME} (shards)"

    with torch.device("meta"):  # no memory and no init cost; the loaded tensors are assigned below
        model = build(config)
    _check_state(model, state, weights=where, config=config_path)
    # load_weights gives fresh, aligned tensors that nothing else holds: they become the parameters as they
    # are (assign=True), so loading costs the model's size once. Popping frees a tensor as soon as it is cast.
    owned = {}
    for key in list(state):
        v = state.pop(key)
        owned[key] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    model.load_state_dict(owned, strict=True, assign=True)
    return model.to(device).eval()


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    name = (
        WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors")
    )
    single, index = folder / name, folder / f"{name}.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: no 'weight_map' object listing the shard files")
        shards = list(weight_map.values())
        if any(not isinstance(s, str) or not s or "/" in s or "\\" in s or s.startswith(".") for s in shards):
            raise WeightsError(f"{index}: shard names must be plain file names in the same folder")
        return [folder / s for s in sorted(set(shards))]
    raise missing_weights(single)


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], *, weights: Path, config: Path) -> None:
    """Raise WeightsError unless ``state`` has exactly the model's keys with the model's shapes."""
    reference = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    wrong_kind = sorted(  # e.g. integer tensors where the model has float weights
        k for k in set(expected) & set(state) if state[k].is_floating_point() != reference[k].is_floating_point()
    )
    if not (missing or unexpected or mismatched or wrong_kind):
        return

    def few(keys: list[str], show: Callable[[str], str] = str) -> str:
        more = f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
        return ", ".join(show(k) for k in keys[:5]) + more

    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if mismatched:
        problems.append(
            "shape mismatches: "
            + few(mismatched, lambda k: f"{k} (file {tuple(state[k].shape)}, config {expected[k]})")
        )
    if wrong_kind:
        problems.append(
            "wrong dtypes: " + few(wrong_kind, lambda k: f"{k} (file {state[k].dtype}, model {reference[k].dtype})")
        )
    raise WeightsError(f"{weights} does not match the model described by {config}: " + "; ".join(problems))
