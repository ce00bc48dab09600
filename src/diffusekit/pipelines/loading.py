"""The model loader: a diffusers model folder or a single checkpoint file -> a pipeline object, and back.

:func:`load_pipeline` is the one entry point for reading a model and :func:`save_pipeline` the one for
writing it; both start from :func:`identify`, the only place that decides which kind of model a path holds.
The formats themselves (configs, key maps, safetensors, pickles) live in ``diffusekit.io``, which hands back
configs and state dicts; this module builds the networks from them and assembles the pipeline. A new family
(SDXL, the x4 upscaler, LoRA files) adds a :class:`ModelKind` in ``identify`` and its branch below.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.atomic import folder_atomic
from diffusekit.io.models import load_unet, load_vae, save_unet, save_vae
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.io.single_file import SingleFileParts, read_single_file_parts, save_single_file
from diffusekit.io.single_file_sdxl import (
    SDXLSingleFileParts,
    check_sdxl_single_file,
    is_sdxl_single_file,
    read_sdxl_single_file_parts,
    save_sdxl_single_file,
)
from diffusekit.io.text import load_text_encoder, load_tokenizer, save_text_encoder, save_tokenizer
from diffusekit.io.weights import read_json, write_json
from diffusekit.limits import check_flag
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.common import LatentCodec
from diffusekit.pipelines.sdxl import StableDiffusionXL, check_xl_parts
from diffusekit.pipelines.stable_diffusion import StableDiffusion, check_parts
from diffusekit.pipelines.super_resolution import SR_PIPELINE_CLASS
from diffusekit.pipelines.upscale import StableDiffusionUpscaler
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.presets import SD1, SDXL

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
LOW_RES_SCHEDULER_CONFIG = Path("low_res_scheduler") / "scheduler_config.json"
UPSCALER_CLASS = "StableDiffusionUpscalePipeline"
DEFAULT_MAX_NOISE_LEVEL = 350  # the reference pipeline's, for a model_index.json without max_noise_level

# model_index.json classes of other families, with what to say about them
_OTHER_PIPELINES = {
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model, which diffusekit does not load yet",
    "DDPMPipeline": "an unconditional or class-conditional model (pixels, or latents with vae/), not a text-to-image "
    "one: load it with diffusekit.pipelines.unconditional.load_pipeline "
    "(CLI: diffusekit sample)",
    SR_PIPELINE_CLASS: "a pixel-space super-resolution model: load it with diffusekit.pipelines.super_resolution."
    "load_sr_pipeline (CLI: diffusekit upscale --model FOLDER IMAGE --out DIR)",
}  # fmt: skip


class Layout(enum.Enum):
    FOLDER = "diffusers folder"
    SINGLE_FILE = "single file"


@dataclass(frozen=True)
class ModelKind:
    """Which model a path holds: its family and on-disk layout."""

    family: str  # "stable-diffusion" (SD 1.x/2.x) for now
    layout: Layout


STABLE_DIFFUSION_FOLDER = ModelKind("stable-diffusion", Layout.FOLDER)
STABLE_DIFFUSION_FILE = ModelKind("stable-diffusion", Layout.SINGLE_FILE)
SDXL_FOLDER = ModelKind("sdxl", Layout.FOLDER)
SDXL_FILE = ModelKind("sdxl", Layout.SINGLE_FILE)
# model_index.json classes of SDXL folders (text-to-image and image-to-image share the components)
SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
UPSCALER_FOLDER = ModelKind("sd-x4-upscaler", Layout.FOLDER)


def identify(path: str | os.PathLike) -> ModelKind:
    """The kind of model at ``path``: a diffusers folder (told by its ``model_index.json``) or a single
    checkpoint file. Paths that are neither get a WeightsError saying what they are instead: nothing, a
    folder without ``model_index.json``, another family's folder, or a file inside a model folder (pass the
    folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        index = path / MODEL_INDEX
        if not index.is_file():
            raise WeightsError(
                f"{path}: not a model folder (no {MODEL_INDEX}); expected the diffusers layout (model_index.json, "
                "unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single checkpoint file"
            )
        name = read_json(index).get("_class_name")
        if isinstance(name, str) and name in _OTHER_PIPELINES:
            raise WeightsError(f"{path}: its {MODEL_INDEX} names {name}: {_OTHER_PIPELINES[name]}")
        if name in SDXL_CLASSES:
            return SDXL_FOLDER
        return UPSCALER_FOLDER if name == UPSCALER_CLASS else STABLE_DIFFUSION_FOLDER
    if path.is_file():
        folder = _enclosing_model_folder(path)
        if folder is not None:
            raise WeightsError(
                f"{path}: is a file of the diffusers model folder {folder}, not a single-file checkpoint; "
                f"pass the folder that holds it: {folder}"
            )
        return SDXL_FILE if is_sdxl_single_file(path) else STABLE_DIFFUSION_FILE
    if path.exists() or path.is_symlink():
        raise WeightsError(f"{path}: not a model folder or a checkpoint file (a broken link or a special file)")
    raise WeightsError(f"{path}: no such folder or file")


def _enclosing_model_folder(path: Path) -> Path | None:
    """The diffusers folder ``path`` lies in (its own folder or the one above: ``model_index.json``,
    ``unet/config.json``), or None."""
    for folder in (path.parent, path.parent.parent):
        if (folder / MODEL_INDEX).is_file():
            return folder
    return None


def load_pipeline(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    fast: bool = True,
) -> StableDiffusion:
    """Load the model at ``path``: a diffusers-layout folder or a single checkpoint file (see
    :func:`identify`). An x4-upscaler folder gives a :class:`StableDiffusionUpscaler`.

    ``tokenizer``: a tokenizer folder (``vocab.json`` + ``merges.txt``, or a model folder holding
    ``tokenizer/``); required for single files, which carry none, and replacing a folder's own. An SDXL
    single file needs both of SDXL's tokenizers: a folder holding ``tokenizer/`` and ``tokenizer_2/`` (any SDXL
    diffusers model folder).
    ``allow_pickle``: read a pickled single file with ``torch.load(weights_only=True)``.
    ``dtype``: of the U-Net and text encoder (the VAE stays float32); None keeps the dtype the file stores
    its U-Net in. ``fast``: apply the runtime plan for inference (:meth:`StableDiffusion.prepare`).
    Weights load from safetensors only (pickles as above); every failure is a DiffusekitError naming the
    file or folder."""
    path = Path(path)
    kind = identify(path)
    if kind == SDXL_FOLDER:
        sd = _load_sdxl_folder(path, tokenizer, device=device, dtype=dtype)
        return sd.prepare() if fast else sd
    if kind.layout is Layout.FOLDER:
        sd = _load_folder(path, tokenizer, device=device, dtype=dtype, upscaler=kind == UPSCALER_FOLDER)
        return sd.prepare() if fast else sd
    if kind == SDXL_FILE:
        sd = _load_sdxl_file(path, tokenizer, allow_pickle=allow_pickle, device=device, dtype=dtype)
        return sd.prepare() if fast else sd
    if tokenizer is None:
        raise ConfigError(
            f"{path}: single-file checkpoints carry no tokenizer; pass tokenizer (CLI: --tokenizer DIR), a folder "
            "with vocab.json and merges.txt such as the tokenizer/ folder of any SD-1.x diffusers model"
        )
    tok = load_tokenizer(tokenizer)
    parts = read_single_file_parts(path, tok, allow_pickle=allow_pickle, dtype=dtype)
    sd = StableDiffusion(
        unet=_network(UNet, parts.unet_config, parts.unet, device),
        codec=LatentCodec(_network(AutoencoderKL, parts.vae_config, parts.vae, device)),
        tokenizer=tok,
        text_encoder=_network(ClipTextEncoder, parts.text_encoder_config, parts.text_encoder, device),
        sampler_config=parts.sampler,
        name=path.stem,
    )
    check_parts(path, sd.unet, sd.codec.vae, sd.tokenizer, sd.text_encoder)
    return sd.prepare() if fast else sd


def _load_folder(
    folder: Path, tokenizer: str | os.PathLike | None, *, device: str | torch.device, dtype: torch.dtype | None,
    upscaler: bool = False,
) -> StableDiffusion:  # fmt: skip
    sched = folder / SCHEDULER_CONFIG
    sampler_config = _scheduler(sched) if sched.exists() else _sd_default_sampler()
    unet = load_unet(folder / "unet", dtype=dtype, device=device)
    dtype = dtype or next(unet.parameters()).dtype
    vae = load_vae(folder / "vae", dtype=torch.float32, device=device)
    tok = load_tokenizer(folder / "tokenizer" if tokenizer is None else tokenizer)
    text_encoder = load_text_encoder(folder / "text_encoder", dtype=dtype, device=device)
    check_parts(folder, unet, vae, tok, text_encoder, image_channels=3 if upscaler else 0)
    parts = dict(unet=unet, codec=LatentCodec(vae), tokenizer=tok, text_encoder=text_encoder,
                 sampler_config=sampler_config, name=folder.resolve().name)  # fmt: skip
    if upscaler:
        return StableDiffusionUpscaler(**parts, **_upscaler_settings(folder, unet))
    return StableDiffusion(**parts)


def _scheduler(path: Path) -> SamplerConfig:
    """The sampler config of a reference ``scheduler_config.json``; messages name the file."""
    try:
        return scheduler_from_diffusers(read_json(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _upscaler_settings(folder: Path, unet: UNet) -> dict:
    """The x4 upscaler's low-resolution noise schedule (``low_res_scheduler/``) and ``max_noise_level``
    (``model_index.json``), checked against the U-Net's table of noise-level embeddings."""
    sched = folder / LOW_RES_SCHEDULER_CONFIG
    if not sched.is_file():
        raise WeightsError(f"{folder}: the x4 upscaler has no {LOW_RES_SCHEDULER_CONFIG} (the schedule that noises "
                           "the low-resolution image)")  # fmt: skip
    max_level = read_json(folder / MODEL_INDEX).get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    table = unet.config.num_classes
    if isinstance(max_level, bool) or not isinstance(max_level, int) or table is None or not 0 <= max_level < table:
        raise ConfigError(f"{folder}: {MODEL_INDEX} max_noise_level={max_level!r} must be an integer below the "
                          f"unet's num_class_embeds ({table}), which embeds the noise level")  # fmt: skip
    return {"low_res_config": _scheduler(sched), "max_noise_level": max_level}


def _load_sdxl_folder(
    folder: Path, tokenizer: str | os.PathLike | None, *, device: str | torch.device, dtype: torch.dtype | None
) -> StableDiffusionXL:
    """An SDXL folder: the SD components plus ``text_encoder_2/`` and ``tokenizer_2/`` (both required; the
    refiner, which has no ``text_encoder/`` and conditions on an aesthetic score, is refused by name) and
    ``force_zeros_for_empty_prompt`` from ``model_index.json`` (the reference's default: true)."""
    index = read_json(folder / MODEL_INDEX)
    if index.get("requires_aesthetics_score") is True or index.get("text_encoder") == [None, None]:
        raise WeightsError(f"{folder}: an SDXL refiner (no text_encoder/, aesthetic-score conditioning), which "
                           "diffusekit does not load yet; the SDXL base model is supported")  # fmt: skip
    for part, what in (("text_encoder_2", "the second text encoder"), ("tokenizer_2", "its tokenizer")):
        if not (folder / part).is_dir():
            raise WeightsError(f"{folder}: an SDXL model folder needs {part}/ ({what}); it is missing")
    try:
        force_zeros = check_flag("force_zeros_for_empty_prompt", index.get("force_zeros_for_empty_prompt", True))
    except ConfigError as e:
        raise ConfigError(f"{folder / MODEL_INDEX}: {e}") from None
    sched = folder / SCHEDULER_CONFIG
    sampler_config = _scheduler(sched) if sched.exists() else SDXL
    unet = load_unet(folder / "unet", dtype=dtype, device=device)
    dtype = dtype or next(unet.parameters()).dtype
    vae = load_vae(folder / "vae", dtype=torch.float32, device=device)
    tok = load_tokenizer(folder / "tokenizer" if tokenizer is None else tokenizer)
    text_encoder = load_text_encoder(folder / "text_encoder", dtype=dtype, device=device)
    tok_2 = load_tokenizer(folder / "tokenizer_2")
    text_encoder_2 = load_text_encoder(folder / "text_encoder_2", dtype=dtype, device=device)
    check_xl_parts(folder, unet, vae, [(tok, text_encoder), (tok_2, text_encoder_2)])
    return StableDiffusionXL(
        unet=unet, codec=LatentCodec(vae), tokenizer=tok, text_encoder=text_encoder, sampler_config=sampler_config,
        tokenizer_2=tok_2, text_encoder_2=text_encoder_2, force_zeros_for_empty_prompt=force_zeros,
        name=folder.resolve().name,
    )  # fmt: skip


def _load_sdxl_file(
    path: Path, tokenizer: str | os.PathLike | None, *, allow_pickle: bool, device: str | torch.device,
    dtype: torch.dtype | None,
) -> StableDiffusionXL:  # fmt: skip
    """An SDXL single file (SGM layout) with the tokenizers of the folder ``tokenizer`` (``tokenizer/`` and
    ``tokenizer_2/``); the file's structure is checked before any tokenizer is read."""
    check_sdxl_single_file(path)
    folder = None if tokenizer is None else Path(tokenizer)
    if folder is None or not (folder / "tokenizer").is_dir() or not (folder / "tokenizer_2").is_dir():
        given = "none was given" if folder is None else f"{folder} does not hold both"
        raise ConfigError(
            f"{path}: an SDXL single file carries no tokenizers; pass tokenizer (CLI: --tokenizer DIR), a folder "
            f"holding SDXL's two, tokenizer/ and tokenizer_2/, such as any SDXL diffusers model folder ({given})"
        )
    tok, tok_2 = load_tokenizer(folder / "tokenizer"), load_tokenizer(folder / "tokenizer_2")
    parts = read_sdxl_single_file_parts(path, tok, tok_2, allow_pickle=allow_pickle, dtype=dtype)
    sd = StableDiffusionXL(
        unet=_network(UNet, parts.unet_config, parts.unet, device),
        codec=LatentCodec(_network(AutoencoderKL, parts.vae_config, parts.vae, device)),
        tokenizer=tok, text_encoder=_network(ClipTextEncoder, parts.text_encoder_config, parts.text_encoder, device),
        tokenizer_2=tok_2,
        text_encoder_2=_network(ClipTextEncoder, parts.text_encoder_2_config, parts.text_encoder_2, device),
        sampler_config=parts.sampler, force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        name=path.stem,
    )  # fmt: skip
    check_xl_parts(path, sd.unet, sd.codec.vae, [(tok, sd.text_encoder), (tok_2, sd.text_encoder_2)])
    return sd


def _sd_default_sampler() -> SamplerConfig:
    """SD-1.x's scheduler, for folders without ``scheduler/scheduler_config.json``."""
    return SD1


M = TypeVar("M", bound=nn.Module)


def _network(build: Callable[[object], M], config: object, state: dict[str, Tensor], device: str | torch.device) -> M:
    """The network ``build(config)`` holding ``state``'s tensors as its parameters (built on the meta device
    and filled with ``assign=True``: no init cost, no second copy), in eval mode on ``device``."""
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def save_pipeline(sd: StableDiffusion, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``sd`` to ``path``: a single ``.safetensors`` file in the SD-1.x layout (SDXL: the SGM layout) when
    ``path`` ends in ``.safetensors`` (``dtype`` casts the weights; no tokenizer inside), else a diffusers-layout
    folder that :func:`load_pipeline` and the reference read (the networks in their own dtypes; ``dtype`` must be None).
    Both are written atomically: a folder is built beside ``path`` and swapped in whole."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if isinstance(sd, StableDiffusionXL):
            save_sdxl_single_file(parts_of(sd), path, dtype=dtype)
            return path
        if isinstance(sd, StableDiffusionUpscaler):
            raise ConfigError(f"{path}: an x4 upscaler is written as a diffusers folder only (its low-res schedule "
                              "and max_noise_level have no place in a single file); give a folder path")  # fmt: skip
        save_single_file(parts_of(sd), path, dtype=dtype)
        return path
    if dtype is not None:
        raise ConfigError(f"{path}: a model folder is written in the networks' own dtypes; dtype must be None")
    with folder_atomic(path, what="model folder") as tmp:
        _save_folder(sd, tmp)
    return path


def parts_of(sd: StableDiffusion) -> SingleFileParts:
    """The networks of ``sd`` as configs and state dicts (what ``io.single_file`` writes; for SDXL the
    :class:`SDXLSingleFileParts` that ``io.single_file_sdxl`` writes)."""
    if isinstance(sd, StableDiffusionXL):
        return SDXLSingleFileParts(
            unet_config=sd.unet.config, unet=sd.unet.state_dict(), vae_config=sd.codec.vae.config,
            vae=sd.codec.vae.state_dict(), text_encoder_config=sd.text_encoder.config,
            text_encoder=sd.text_encoder.state_dict(), sampler=sd.sampler_config,
            text_encoder_2_config=sd.text_encoder_2.config, text_encoder_2=sd.text_encoder_2.state_dict(),
            force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt,
        )  # fmt: skip
    return SingleFileParts(
        unet_config=sd.unet.config,
        unet=sd.unet.state_dict(),
        vae_config=sd.codec.vae.config,
        vae=sd.codec.vae.state_dict(),
        text_encoder_config=sd.text_encoder.config,
        text_encoder=sd.text_encoder.state_dict(),
        sampler=sd.sampler_config,
    )


def _save_folder(sd: StableDiffusion, folder: Path) -> None:
    save_unet(sd.unet, folder / "unet")
    save_vae(sd.codec.vae, folder / "vae")
    save_text_encoder(sd.text_encoder, folder / "text_encoder")
    save_tokenizer(sd.tokenizer, folder / "tokenizer")
    sched = scheduler_to_diffusers(sd.sampler_config)
    write_json(sched, folder / SCHEDULER_CONFIG)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if isinstance(sd, StableDiffusionXL):
        save_text_encoder(sd.text_encoder_2, folder / "text_encoder_2")
        save_tokenizer(sd.tokenizer_2, folder / "tokenizer_2")
        del index["safety_checker"], index["requires_safety_checker"]
        index.update(_class_name=SDXL_CLASSES[0], text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt)  # fmt: skip
    if isinstance(sd, StableDiffusionUpscaler):
        low_res = scheduler_to_diffusers(sd.low_res_config)
        write_json(low_res, folder / LOW_RES_SCHEDULER_CONFIG)
        index.update(_class_name=UPSCALER_CLASS, low_res_scheduler=["diffusers", low_res["_class_name"]],
                     max_noise_level=sd.max_noise_level)  # fmt: skip
    write_json(index, folder / MODEL_INDEX)


__all__ = ["Layout", "ModelKind", "identify", "load_pipeline", "parts_of", "save_pipeline"]
