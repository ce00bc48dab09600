"""Single-file SDXL checkpoints in Stability AI's SGM (generative-models) key layout: read and written.

One ``.safetensors`` file holds the four networks under these prefixes:

* ``model.diffusion_model.``: the U-Net, named as in SD-1.x files (``io.single_file_layout``), with SDXL's added
  text/time embedding under ``label_emb.0.0`` / ``label_emb.0.2`` (our ``add_embedding.linear_1`` / ``_2``);
* ``first_stage_model.``: the VAE, as in SD-1.x files;
* ``conditioner.embedders.0.transformer.text_model.``: the first text encoder (CLIP ViT-L) in the reference's
  (transformers) names, as ``io.text`` maps them;
* ``conditioner.embedders.1.model.``: the second, OpenCLIP ViT-bigG text tower in OpenCLIP's names:
  ``token_embedding.weight``, ``positional_embedding`` (a bare tensor), ``transformer.resblocks.{i}.ln_1`` /
  ``ln_2`` / ``attn.in_proj_weight`` and ``attn.in_proj_bias`` (q, k, v stacked along dim 0) /
  ``attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj``, ``ln_final``, and ``text_projection`` stored as a
  (width, projection) matrix that multiplies from the right: the transpose of our Linear's weight.
  ``logit_scale`` (CLIP's contrastive temperature) is not part of the text encoder and is ignored.

The SDXL refiner (its only encoder, OpenCLIP, under ``conditioner.embedders.0.model.``) is refused by name.
As for SD-1.x files, network sizes are inferred from tensor shapes where the file carries no ``diffusekit.*``
metadata (what shapes do not tell takes the SDXL base model's values: 64-wide heads, 32 GroupNorm groups, the
VAE factor 0.13025, Euler on the SD schedule), and files written by :func:`save_sdxl_single_file` store our
exact configs there. The mapping of each key runs both ways from one table per network.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.io.single_file import (
    IGNORED_KEYS,
    LazySafetensors,
    SingleFileParts,
    check_keys,
    config_from_metadata,
    expected_keys,
    file_metadata,
    read_pickle,
    take,
    text_config_from_dict,
)
from diffusekit.io.single_file_layout import (
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMap,
    infer_text_encoder_config,
    infer_unet_config,
    infer_vae_config,
    text_encoder_key_map,
    unet_key_map,
    vae_key_map,
)
from diffusekit.io.weights import SafetensorsFile, not_a_weights_file, require_file, save_weights, sniff_format
from diffusekit.limits import check_flag
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.networks.vae import AutoencoderKL, VAEConfig
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.presets import SDXL

TEXT_ENCODER_1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's one (OpenCLIP) encoder
SDXL_PREFIX = "conditioner.embedders."
SDXL_HEAD_SIZE = 64  # SDXL's U-Net and both CLIP towers use 64-wide attention heads
SDXL_VAE_SCALING_FACTOR = 0.13025
SDXL_SAMPLE_SIZE = 128  # the U-Net's, in latent pixels
SDXL_IMAGE_SIZE = 1024  # the VAE's, in image pixels
NUM_TIME_IDS = 6  # original size, crop corner, target size (Podell et al. 2023, sec. 2.2)
# The scheduler SDXL base was released with (Euler, leading spacing, steps_offset 1), as its config says it
SDXL_SCHEDULER = scheduler_to_diffusers(dataclasses.replace(SDXL, reference_rules=True))
# Keys of real SDXL files that are no network weight: those of SD-1.x files, CLIP-L's position index table
# and OpenCLIP's contrastive temperature.
SDXL_IGNORED_KEYS = re.compile(
    rf"{IGNORED_KEYS.pattern}|{re.escape(TEXT_ENCODER_1_PREFIX)}embeddings\.position_ids"
    rf"|{re.escape(TEXT_ENCODER_2_PREFIX)}(logit_scale|attn_mask)"
)
_META_KEYS = {"unet": "diffusekit.unet", "vae": "diffusekit.vae", "text": "diffusekit.text_encoder",
              "text_2": "diffusekit.text_encoder_2", "sampler": "diffusekit.sampler",
              "force_zeros": "diffusekit.force_zeros_for_empty_prompt"}  # fmt: skip
_OTHER = {"cond_stage_model.": "an SD-1.x/2.x checkpoint, not an SDXL one"}


@dataclass
class SDXLSingleFileParts(SingleFileParts):
    """:class:`SingleFileParts` of an SDXL file (``text_encoder`` is the first, CLIP ViT-L encoder) plus the
    second, projection-headed encoder and ``force_zeros_for_empty_prompt``."""

    text_encoder_2_config: TextEncoderConfig
    text_encoder_2: dict[str, Tensor]
    force_zeros_for_empty_prompt: bool = True


# ---------------------------------------------------------------------------------------------------------
# The OpenCLIP text tower's keys: one table, read both ways


@dataclass(frozen=True)
class OpenClipKey:
    """Where one of our parameters lives in the file: ``key``, the ``part`` (0, 1, 2 = q, k, v) of a fused
    q/k/v tensor or None, and whether the file holds it ``transposed``."""

    key: str
    part: int | None = None
    transposed: bool = False


_OPEN_CLIP_LAYER = {"norm1": "ln_1", "norm2": "ln_2", "attn.out": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_key_map(config: TextEncoderConfig, prefix: str = TEXT_ENCODER_2_PREFIX) -> dict[str, OpenClipKey]:
    """{our parameter name: where the file holds it} for a text encoder with this config, in OpenCLIP's names."""
    out = {
        "token_embedding.weight": OpenClipKey(prefix + "token_embedding.weight"),
        "position_embedding.weight": OpenClipKey(prefix + "positional_embedding"),
        "final_norm.weight": OpenClipKey(prefix + "ln_final.weight"),
        "final_norm.bias": OpenClipKey(prefix + "ln_final.bias"),
    }
    if config.projection_dim is not None:
        out["text_projection.weight"] = OpenClipKey(prefix + "text_projection", transposed=True)
    for i in range(config.num_layers):
        theirs = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for part, proj in enumerate("qkv"):
                out[f"blocks.{i}.attn.{proj}.{kind}"] = OpenClipKey(f"{theirs}attn.in_proj_{kind}", part)
            for ours, name in _OPEN_CLIP_LAYER.items():
                out[f"blocks.{i}.{ours}.{kind}"] = OpenClipKey(f"{theirs}{name}.{kind}")
    return out


def _open_clip_shapes(key_map: dict[str, OpenClipKey], shapes: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """{file key: its shape} from our parameters' shapes (fused q/k/v: three stacked; transposed: reversed)."""
    out: dict[str, tuple[int, ...]] = {}
    for ours, where in key_map.items():
        shape = tuple(shapes[ours].shape)
        if where.part is not None:
            shape = (3 * shape[0], *shape[1:])
        out[where.key] = shape[::-1] if where.transposed else shape
    return out


def _take_open_clip(
    read: Callable[[str], Tensor], key_map: dict[str, OpenClipKey], *, dtype: torch.dtype, source: Path
) -> dict[str, Tensor]:
    """Our state dict of the OpenCLIP tower, read key by key (a fused tensor once per q, k, v) and cast."""
    owned = {}
    for ours, where in key_map.items():
        v = read(where.key)
        if not v.is_floating_point():
            raise WeightsError(f"{source}: tensor {where.key!r} has dtype {v.dtype}; a floating-point weight was "
                               "expected")  # fmt: skip
        if where.part is not None:
            v = v.chunk(3, dim=0)[where.part]
        if where.transposed:
            v = v.t()
        owned[ours] = v.to(dtype).clone(memory_format=torch.contiguous_format)
    return owned


def _open_clip_state_dict(state: dict[str, Tensor], key_map: dict[str, OpenClipKey]) -> dict[str, Tensor]:
    """Our OpenCLIP tower's state dict -> the file's tensors (q, k, v stacked again; the projection transposed)."""
    unknown = sorted(set(state) - set(key_map))
    if unknown:
        raise WeightsError(f"text_encoder_2 parameters with no single-file name: {', '.join(unknown[:5])}")
    fused: dict[str, list[Tensor | None]] = {}
    out: dict[str, Tensor] = {}
    for ours, v in state.items():
        where = key_map[ours]
        if where.part is not None:
            fused.setdefault(where.key, [None, None, None])[where.part] = v
        else:
            out[where.key] = v.t() if where.transposed else v
    for key, parts in fused.items():
        out[key] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Telling an SDXL file, and its structure


def is_sdxl_single_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.safetensors`` file with SDXL's ``conditioner.embedders.*`` keys (its header
    only is read). Pickles, unreadable and damaged files give False: their reader names the problem."""
    try:
        if sniff_format(path) != "safetensors":
            return False
        with SafetensorsFile(path) as f:  # the header's keys only: no tensor is read
            return any(k.startswith(SDXL_PREFIX) for k in f.keys())
    except (WeightsError, ConfigError, OSError):
        return False


def check_sdxl_structure(keys: list[str], path: Path) -> None:
    """WeightsError naming the file unless ``keys`` hold the four SDXL base networks' prefixes: the refiner and
    a file missing a text encoder (or the U-Net, or the VAE) are each named with the missing prefix."""
    has = {p: any(k.startswith(p) for k in keys) for p in (UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_1_PREFIX,
                                                         TEXT_ENCODER_2_PREFIX, REFINER_PREFIX)}  # fmt: skip
    if has[REFINER_PREFIX] and not has[TEXT_ENCODER_2_PREFIX]:
        raise WeightsError(f"{path}: an SDXL refiner checkpoint (one OpenCLIP text encoder under {REFINER_PREFIX}*, "
                           "aesthetic-score conditioning), which diffusekit does not load yet; the SDXL base "
                           "model is supported")  # fmt: skip
    what = {TEXT_ENCODER_1_PREFIX: "the first text encoder (CLIP ViT-L)",
            TEXT_ENCODER_2_PREFIX: "the second text encoder (OpenCLIP ViT-bigG)", UNET_PREFIX: "the U-Net",
            VAE_PREFIX: "the VAE"}  # fmt: skip
    for prefix, name in what.items():
        if not has[prefix]:
            raise WeightsError(f"{path}: an SDXL checkpoint without {name}: no {prefix}* keys (a file holding only "
                               "some of the networks cannot be loaded as a model)")  # fmt: skip


def check_sdxl_single_file(path: str | os.PathLike) -> None:
    """:func:`check_sdxl_structure` on a ``.safetensors`` file's header (pickles are checked when read)."""
    path = require_file(path, "checkpoint file")
    if sniff_format(path) == "safetensors":
        with SafetensorsFile(path) as f:
            check_sdxl_structure(f.keys(), path)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_sdxl_single_file_parts(
    path: str | os.PathLike,
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> SDXLSingleFileParts:
    """Read an SDXL single file (safetensors; a pickle only with ``allow_pickle``) into
    :class:`SDXLSingleFileParts`. ``tokenizer`` / ``tokenizer_2`` give each encoder's special-token ids.
    The U-Net and text encoders are cast to ``dtype`` (None: the dtype of the file's U-Net); the VAE is
    float32. Missing, unexpected, mis-shaped or non-finite tensors raise WeightsError naming the file."""
    path = require_file(path, "checkpoint file")
    kind = sniff_format(path)
    if kind == "pickle":
        state = read_pickle(path, allow_pickle)
        return _parts(state, state.__getitem__, {}, tokenizer, tokenizer_2, path=path, dtype=dtype)
    if kind is None and path.suffix.lower() != ".safetensors":
        raise not_a_weights_file(path, pickles=True)
    with LazySafetensors(path) as lazy:
        return _parts(lazy.tensors, lazy.read, lazy.metadata, tokenizer, tokenizer_2, path=path, dtype=dtype)


def _component(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def infer_open_clip_config(state: dict[str, Tensor], tokenizer: ClipTokenizer) -> TextEncoderConfig:
    """The OpenCLIP tower's config from its tensors (``conditioner.embedders.1.model.`` removed): sizes from
    the shapes, 64-wide heads, exact GELU, the projection width from ``text_projection``, special-token ids
    from ``tokenizer`` (SDXL's pads with id 0)."""
    p = TEXT_ENCODER_2_PREFIX

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise WeightsError(f"missing key {p + key} (needed to infer the second text encoder's size)")
        return tuple(state[key].shape)

    vocab, hidden = shape("token_embedding.weight")
    layers = {int(m.group(1)) for k in state if (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.ln_1\.weight", k))}
    projection = shape("text_projection")[1] if "text_projection" in state else None
    try:
        return TextEncoderConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=len(layers),
            num_heads=hidden // SDXL_HEAD_SIZE if hidden % SDXL_HEAD_SIZE == 0 else 1,
            mlp_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
            max_positions=shape("positional_embedding")[0], activation="gelu", projection_dim=projection,
            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        )  # fmt: skip
    except ConfigError as e:
        raise WeightsError(f"the second text encoder's tensors describe no valid OpenCLIP text tower: {e}") from None


def infer_sdxl_unet_config(state: dict[str, Tensor], projection_dim: int | None) -> UNetConfig:
    """The SDXL U-Net's config from its tensors (``model.diffusion_model.`` removed): the SD-1.x inference
    (:func:`~diffusekit.io.single_file_layout.infer_unet_config`) with 64-wide heads, a transformer depth per
    level, and the added embedding's widths: ``label_emb.0.0`` takes the pooled text (``projection_dim``)
    followed by six sinusoidal time-id features."""
    base = infer_unet_config(state)
    heads = tuple(max(1, ch // SDXL_HEAD_SIZE) for ch in base.channels)
    n = base.layers_per_block + 1
    depth = []
    for level, attention in enumerate(base.attention_levels):
        block = f"input_blocks.{1 + level * n}.1"
        found = {int(m.group(1)) for k in state
                 if (m := re.fullmatch(re.escape(block) + r"\.transformer_blocks\.(\d+)\..*", k))}  # fmt: skip
        depth.append(len(found) if attention and found else 1)
    if "label_emb.0.0.weight" not in state:
        raise WeightsError(f"missing key {UNET_PREFIX}label_emb.0.0.weight (SDXL's added text/time embedding)")
    text_time = state["label_emb.0.0.weight"].shape[1]
    if projection_dim is None or (text_time - projection_dim) % NUM_TIME_IDS or text_time <= projection_dim:
        raise WeightsError(f"{UNET_PREFIX}label_emb.0.0.weight takes {text_time} features, which is not the second "
                           f"text encoder's projection ({projection_dim}) + {NUM_TIME_IDS} time ids")  # fmt: skip
    try:
        return dataclasses.replace(
            base, num_heads=heads, transformer_depth=tuple(depth), text_time_features=text_time,
            time_id_features=(text_time - projection_dim) // NUM_TIME_IDS, sample_size=SDXL_SAMPLE_SIZE,
        )  # fmt: skip
    except ConfigError as e:
        raise WeightsError(f"the U-Net tensors describe no valid SDXL U-Net: {e}") from None


def _parts(
    state: dict[str, Tensor],
    read: Callable[[str], Tensor],
    metadata: dict[str, str],
    tokenizer: ClipTokenizer,
    tokenizer_2: ClipTokenizer,
    *,
    path: Path,
    dtype: torch.dtype | None,
) -> SDXLSingleFileParts:
    check_sdxl_structure(list(state), path)

    def config(key: str, parse: Callable[[dict], Any], infer: Callable[[], Any]) -> Any:
        return config_from_metadata(metadata, _META_KEYS[key], parse, infer, path)

    text_config = config(
        "text",
        text_config_from_dict,
        lambda: infer_text_encoder_config(_component(state, TEXT_ENCODER_1_PREFIX), tokenizer),
    )
    text_2_config = config(
        "text_2",
        text_config_from_dict,
        lambda: infer_open_clip_config(_component(state, TEXT_ENCODER_2_PREFIX), tokenizer_2),
    )
    unet_config = config(
        "unet",
        UNetConfig.from_dict,
        lambda: infer_sdxl_unet_config(_component(state, UNET_PREFIX), text_2_config.projection_dim),
    )
    vae_config = config(
        "vae",
        VAEConfig.from_dict,
        lambda: dataclasses.replace(
            infer_vae_config(_component(state, VAE_PREFIX)),
            scaling_factor=SDXL_VAE_SCALING_FACTOR,
            sample_size=SDXL_IMAGE_SIZE,
        ),
    )
    sampler = config("sampler", SamplerConfig.from_dict, lambda: scheduler_from_diffusers(SDXL_SCHEDULER))
    force_zeros = config("force_zeros", lambda d: check_flag("force_zeros_for_empty_prompt", d.get("value")),
                         lambda: True)  # fmt: skip
    for suffix, tok, cfg in (("", tokenizer, text_config), ("_2", tokenizer_2, text_2_config)):
        ids = max(tok.vocab.values())
        if ids >= cfg.vocab_size:
            raise WeightsError(f"tokenizer{suffix} has token ids up to {ids}, but text_encoder{suffix} in {path} "
                               f"knows only {cfg.vocab_size} tokens; use the tokenizers this model was trained "
                               "with")  # fmt: skip
    dtype = dtype or next((v.dtype for k, v in state.items() if k.startswith(UNET_PREFIX) and v.is_floating_point()),
                          torch.float32)  # fmt: skip
    maps: list[tuple[KeyMap, type, Any, torch.dtype]] = [
        (unet_key_map(unet_config), UNet, unet_config, dtype),
        (vae_key_map(vae_config), AutoencoderKL, vae_config, torch.float32),
        (text_encoder_key_map(text_config, TEXT_ENCODER_1_PREFIX), ClipTextEncoder, text_config, dtype),
    ]
    with torch.device("meta"):
        shapes = [build(cfg).state_dict() for _, build, cfg, _ in maps]
        shapes_2 = ClipTextEncoder(text_2_config).state_dict()
    clip_map = open_clip_key_map(text_2_config)
    expected, convs = expected_keys([(m[0], s) for m, s in zip(maps, shapes)])
    expected.update(_open_clip_shapes(clip_map, shapes_2))
    check_keys(state, expected, convs, path, layout="the SDXL single-file (SGM) layout", ignored=SDXL_IGNORED_KEYS,
               families=_OTHER)  # fmt: skip
    unet, vae, text = (
        take(read, key_map, exp, dtype=dt, source=path) for (key_map, _, _, dt), exp in zip(maps, shapes)
    )
    text_2 = _take_open_clip(read, clip_map, dtype=dtype, source=path)
    return SDXLSingleFileParts(unet_config, unet, vae_config, vae, text_config, text, sampler, text_2_config, text_2,
                               force_zeros)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Writing


def to_sdxl_state_dict(parts: SDXLSingleFileParts, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The four networks' tensors under their SGM keys, contiguous; ``dtype`` casts floating tensors."""
    out: dict[str, Tensor] = {}
    networks = [
        (parts.unet, unet_key_map(parts.unet_config)),
        (parts.vae, vae_key_map(parts.vae_config)),
        (parts.text_encoder, text_encoder_key_map(parts.text_encoder_config, TEXT_ENCODER_1_PREFIX)),
    ]
    for state, key_map in networks:
        unknown = sorted(set(state) - set(key_map.names))
        if unknown:
            raise WeightsError(f"parameters with no single-file name: {', '.join(unknown[:5])}")
        for ours, v in state.items():
            v = v.detach().cpu()
            out[key_map.names[ours]] = v[:, :, None, None] if ours in key_map.conv_weights else v
    detached = {k: v.detach().cpu() for k, v in parts.text_encoder_2.items()}
    out.update(_open_clip_state_dict(detached, open_clip_key_map(parts.text_encoder_2_config)))
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in out.items()}


def save_sdxl_single_file(
    parts: SDXLSingleFileParts, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> None:
    """Write ``parts`` as one ``.safetensors`` file in the SGM layout (atomically), with our exact configs
    in its metadata so that :func:`read_sdxl_single_file_parts` rebuilds the same networks; no tokenizer is
    stored. ``dtype`` (e.g. ``torch.float16``) casts the weights."""
    configs = {"unet": parts.unet_config.to_dict(), "vae": parts.vae_config.to_dict(),
               "text": parts.text_encoder_config.to_dict(), "text_2": parts.text_encoder_2_config.to_dict(),
               "sampler": parts.sampler.to_dict(), "force_zeros": {"value": parts.force_zeros_for_empty_prompt}}
    path = Path(path)
    metadata = file_metadata(path, configs, _META_KEYS)
    save_weights(to_sdxl_state_dict(parts, dtype), path, metadata=metadata)


__all__ = [
    "REFINER_PREFIX",
    "SDXLSingleFileParts",
    "SDXL_IGNORED_KEYS",
    "SDXL_SCHEDULER",
    "TEXT_ENCODER_1_PREFIX",
    "TEXT_ENCODER_2_PREFIX",
    "OpenClipKey",
    "check_sdxl_single_file",
    "check_sdxl_structure",
    "infer_open_clip_config",
    "infer_sdxl_unet_config",
    "is_sdxl_single_file",
    "open_clip_key_map",
    "read_sdxl_single_file_parts",
    "save_sdxl_single_file",
    "to_sdxl_state_dict",
]
