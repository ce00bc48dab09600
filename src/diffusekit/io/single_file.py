"""Single-file Stable Diffusion 1.x checkpoints in the original CompVis / latent-diffusion key layout.

One ``.safetensors`` file holds the three networks under these prefixes:

* ``model.diffusion_model.``: the U-Net (``time_embed``, ``input_blocks``, ``middle_block``,
  ``output_blocks``, ``out``; residual blocks named ``in_layers`` / ``emb_layers`` / ``out_layers``);
* ``first_stage_model.``: the VAE (``encoder.down.{level}.block.{i}``, ``mid.block_1`` / ``attn_1`` /
  ``block_2``, ``decoder.up.{level}``; the mid attention's q/k/v/proj_out stored as 1x1 convolutions);
* ``cond_stage_model.transformer.text_model.``: the CLIP text encoder (its names are mapped by ``io.text``).

The key mapping between these names and ours lives here and only here: ``_unet_modules`` and
``_vae_modules`` list, for a config, which of our modules is which module of the file, and two small
tables rename the parameters inside a residual block or attention layer. The same mapping runs both ways
(:func:`read_single_file_parts` / :func:`save_single_file`). This module deals in configs and state dicts
only (:class:`SingleFileParts`); ``pipelines.loading`` builds the pipeline from them.

Single files carry no configs, so the network sizes are inferred from the tensor shapes; what shapes do
not tell (head counts, GroupNorm groups, the noise schedule) takes the SD-1.x values. Files written by
:func:`save_single_file` also store our exact configs in the safetensors metadata (``diffusekit.*``
entries, ignored by other tools), which are then used instead. Single files carry no tokenizer either: pass
the folder of one (any SD-1.x ``tokenizer/`` folder).

Pickles (told from their first bytes, whatever the name) are refused unless ``allow_pickle=True``, which
reads them with ``torch.load(weights_only=True)`` (tensors and plain containers only; never arbitrary
objects). Files that hold the text encoder twice (``text_model.`` names and the older ones) are refused when
the copies differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError, DiffusekitError, WeightsError
from diffusekit.io.text import SINGLE_FILE_PREFIX, to_reference_state_dict
from diffusekit.io.text_encoder_config import text_encoder_from_diffusers, text_encoder_to_diffusers
from diffusekit.io.weights import (
    PICKLE_SUFFIXES,
    SafetensorsFile,
    check_finite,
    not_a_weights_file,
    pickle_refused,
    require_file,
    save_weights,
    sniff_format,
)
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.networks.vae import AutoencoderKL, VAEConfig
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.presets import SD1

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = SINGLE_FILE_PREFIX  # "cond_stage_model.transformer.text_model."

# The scheduler every SD-1.x model was released with, as its diffusers ``scheduler_config.json`` says it
SD1_SCHEDULER = dataclasses.replace(SD1, reference_rules=True).to_reference()
SD1_UNET_HEADS = 8  # SD-1.x: 8 heads at every level (head size = channels / 8)
SD1_NORM_GROUPS = 32
SD1_VAE_SCALING_FACTOR = 0.18215

# Keys real SD-1.x files carry that are not weights of the three networks: the training noise schedule, the
# EMA copy of the U-Net (``model_ema.*``; the file's main U-Net is used), the autoencoder's training loss and
# CLIP's position-index buffer.
_IGNORED_KEYS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar"
    r"|model_ema\..*|first_stage_model\.loss\..*|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)"
)
# Families we recognise but do not read, with what to say.
_OTHER_FAMILIES = {
    "cond_stage_model.model.": "an SD-2.x checkpoint (OpenCLIP text encoder); only SD-1.x single files are read",
    "conditioner.embedders.": "an SDXL checkpoint; only SD-1.x single files are read",
}
_META_KEYS = {"unet": "diffusekit.unet", "vae": "diffusekit.vae", "text": "diffusekit.text_encoder",
              "sampler": "diffusekit.sampler"}  # fmt: skip

# Parameter names inside one module: ours -> the file's.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}  # the module's inner names are the file's (transformers, convolutions)


# ---------------------------------------------------------------------------------------------------------
# Which of our modules is which module of the file


def _unet_modules(c: UNetConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Our U-Net module paths -> (the file's module path, inner renames). LDM numbers its ``input_blocks``
    consecutively: 0 is ``conv_in``, then per level ``layers_per_block`` (resnet[, transformer]) blocks and a
    downsampler; ``output_blocks`` hold per level ``layers_per_block + 1`` (resnet[, transformer][, upsampler])."""
    n = c.layers_per_block + 1  # LDM blocks per level
    modules: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", _SAME),
        "time_embedding.linear_2": ("time_embed.2", _SAME),
        "class_embedding": ("label_emb", _SAME),
        "conv_in": ("input_blocks.0.0", _SAME),
        "conv_norm_out": ("out.0", _SAME),
        "conv_out": ("out.2", _SAME),
    }
    for level in range(c.levels):
        for i in range(c.layers_per_block):
            block = f"input_blocks.{1 + level * n + i}"
            modules[f"down_blocks.{level}.resnets.{i}"] = (f"{block}.0", _UNET_RESNET)
            modules[f"down_blocks.{level}.attentions.{i}"] = (f"{block}.1", _SAME)
        modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{1 + level * n + n - 1}.0.op", _SAME)
    middle = ["resnets.0", "attentions.0", "resnets.1"] if c.mid_attention else ["resnets.0", "resnets.1"]
    for i, name in enumerate(middle):
        modules[f"mid_block.{name}"] = (f"middle_block.{i}", _UNET_RESNET if "resnets" in name else _SAME)
    for up in range(c.levels):
        attention = c.attention_levels[c.levels - 1 - up]  # up_blocks.0 is the deepest level
        for i in range(n):
            modules[f"up_blocks.{up}.resnets.{i}"] = (f"output_blocks.{up * n + i}.0", _UNET_RESNET)
            modules[f"up_blocks.{up}.attentions.{i}"] = (f"output_blocks.{up * n + i}.1", _SAME)
        upsampler = f"output_blocks.{up * n + n - 1}.{2 if attention else 1}.conv"  # after resnet[, transformer]
        modules[f"up_blocks.{up}.upsamplers.0.conv"] = (upsampler, _SAME)
    return modules


def _vae_modules(c: VAEConfig) -> dict[str, tuple[str, dict[str, str]]]:
    """Our VAE module paths -> (the file's module path, inner renames). LDM numbers the decoder's ``up``
    levels by resolution (0 = full size), ours in the order they run (0 = deepest)."""
    levels = len(c.channels)
    modules: dict[str, tuple[str, dict[str, str]]] = {"quant_conv": ("quant_conv", _SAME),
                                                      "post_quant_conv": ("post_quant_conv", _SAME)}  # fmt: skip
    for side in ("encoder", "decoder"):
        modules[f"{side}.conv_in"] = (f"{side}.conv_in", _SAME)
        modules[f"{side}.conv_out"] = (f"{side}.conv_out", _SAME)
        modules[f"{side}.conv_norm_out"] = (f"{side}.norm_out", _SAME)
        modules[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET)
        modules[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
        modules[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET)
    for level in range(levels):
        for i in range(c.layers_per_block):
            modules[f"encoder.down_blocks.{level}.resnets.{i}"] = (f"encoder.down.{level}.block.{i}", _VAE_RESNET)
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", _SAME)
    for up in range(levels):
        level = levels - 1 - up
        for i in range(c.layers_per_block + 1):
            modules[f"decoder.up_blocks.{up}.resnets.{i}"] = (f"decoder.up.{level}.block.{i}", _VAE_RESNET)
        modules[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", _SAME)
    return modules


def _rename(key: str, modules: dict[str, tuple[str, dict[str, str]]]) -> str:
    """One of our parameter names -> the file's, through the longest module path that matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found = modules.get(".".join(parts[:cut]))
        if found is not None:
            theirs, inner = found
            rest = ".".join(parts[cut:])
            for ours_name, their_name in inner.items():
                if rest.startswith(ours_name + "."):
                    rest = their_name + rest[len(ours_name) :]
                    break
            return f"{theirs}.{rest}"
    raise WeightsError(f"parameter {key!r} has no single-file name")  # a module tree this file does not know


@dataclass(frozen=True)
class KeyMap:
    """{our parameter name: the file's full key} for one network, and which of our 2-D weights the file
    stores as 1x1 convolutions (the VAE mid attention's projections)."""

    names: dict[str, str]
    conv_weights: frozenset[str] = frozenset()


def unet_key_map(config: UNetConfig) -> KeyMap:
    """The single-file keys of a U-Net with this config."""
    modules = _unet_modules(config)
    return KeyMap({k: UNET_PREFIX + _rename(k, modules) for k in _meta_state(UNet, config)})


def vae_key_map(config: VAEConfig) -> KeyMap:
    """The single-file keys of a VAE with this config."""
    modules = _vae_modules(config)
    keys = _meta_state(AutoencoderKL, config)
    names = {k: VAE_PREFIX + _rename(k, modules) for k in keys}
    convs = frozenset(k for k in keys if ".mid_block.attentions." in k and k.endswith(".weight") and keys[k] == 2)
    return KeyMap(names, convs)


def text_encoder_key_map(config: TextEncoderConfig) -> KeyMap:
    """The single-file keys of a CLIP text encoder with this config (the names ``io.text`` gives it)."""
    names = {}
    for k in _meta_state(ClipTextEncoder, config):
        (theirs,) = to_reference_state_dict({k: torch.empty(0)}, prefix=TEXT_ENCODER_PREFIX)
        names[k] = theirs
    return KeyMap(names)


def _meta_state(build: Callable[[Any], nn.Module], config: Any) -> dict[str, int]:
    """{parameter name: ndim} of the network ``build(config)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build(config)
    return {k: v.ndim for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Configs from tensor shapes


def _shape(state: dict[str, Tensor], key: str, prefix: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsError(f"missing key {prefix + key} (needed to infer the network's size)")
    return tuple(state[key].shape)


def _indices(state: dict[str, Tensor], pattern: str) -> list[int]:
    """The sorted distinct integers captured by ``pattern`` (one group) over the keys of ``state``."""
    compiled = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := compiled.fullmatch(k))})


def _norm_groups(channels: tuple[int, ...], what: str) -> int:
    if any(ch % SD1_NORM_GROUPS for ch in channels):
        raise WeightsError(
            f"the {what} has channels {list(channels)}, not all divisible by SD-1.x's {SD1_NORM_GROUPS} GroupNorm "
            "groups; this is not an SD-1.x network and the file carries no config for it"
        )
    return SD1_NORM_GROUPS


def infer_unet_config(state: dict[str, Tensor]) -> UNetConfig:
    """A U-Net config from LDM-named U-Net tensors (``model.diffusion_model.`` removed). Sizes, levels,
    attention placement, cross-attention width, transformer depth and projection kind come from the shapes;
    heads and GroupNorm groups are SD-1.x's (8 heads; 64-wide heads for linear-projection, SD-2-style nets)."""
    p = UNET_PREFIX
    c0_out, in_channels = _shape(state, "input_blocks.0.0.weight", p)[:2]
    downs = _indices(state, r"input_blocks\.(\d+)\.0\.op\.weight")
    inputs = _indices(state, r"input_blocks\.(\d+)\..*")
    layers = downs[0] - 1 if downs else max(inputs)
    if layers < 1:
        raise WeightsError(f"cannot infer the U-Net's blocks per level from the keys under {p}input_blocks")
    n = layers + 1
    levels = len(downs) + 1
    first = [1 + level * n for level in range(levels)]
    channels = tuple(_shape(state, f"input_blocks.{b}.0.out_layers.3.weight", p)[0] for b in first)
    attention = tuple(f"input_blocks.{b}.1.norm.weight" in state for b in first)
    mid_attention = "middle_block.1.norm.weight" in state
    attn_block = next((f"input_blocks.{b}.1" for b, a in zip(first, attention) if a), "middle_block.1")
    cross_dim = depth = None
    linear = False
    if any(attention) or mid_attention:
        cross_dim = _shape(state, f"{attn_block}.transformer_blocks.0.attn2.to_k.weight", p)[1]
        depth = len(_indices(state, re.escape(attn_block) + r"\.transformer_blocks\.(\d+)\..*"))
        linear = len(_shape(state, f"{attn_block}.proj_in.weight", p)) == 2
    heads = tuple(max(1, ch // 64) if linear else SD1_UNET_HEADS for ch in channels)
    num_classes = state["label_emb.weight"].shape[0] if "label_emb.weight" in state else None
    if _shape(state, "time_embed.0.weight", p) != (4 * c0_out, c0_out):
        raise WeightsError(f"{p}time_embed.0.weight must be (4 x {c0_out}, {c0_out}) for this U-Net")
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=_shape(state, "out.2.weight", p)[0],
            channels=channels,
            layers_per_block=layers,
            attention_levels=attention,
            mid_attention=mid_attention,
            num_heads=heads,
            cross_attention_dim=cross_dim,
            transformer_depth=depth or 1,
            use_linear_projection=linear,
            num_classes=num_classes,
            norm_groups=_norm_groups(channels, "U-Net"),
            sample_size=64,
        )
    except ConfigError as e:
        raise WeightsError(f"the U-Net tensors describe no valid U-Net: {e}") from None


def infer_vae_config(state: dict[str, Tensor]) -> VAEConfig:
    """A VAE config from LDM-named VAE tensors (``first_stage_model.`` removed); GroupNorm groups and the
    latent scaling factor are SD-1.x's (32, 0.18215)."""
    p = VAE_PREFIX
    levels = _indices(state, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    layers = _indices(state, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
    if not levels or not layers:
        raise WeightsError(f"missing keys {p}encoder.down.0.block.0.* (needed to infer the VAE's size)")
    channels = tuple(_shape(state, f"encoder.down.{level}.block.0.conv2.weight", p)[0] for level in levels)
    try:
        return VAEConfig(
            in_channels=_shape(state, "encoder.conv_in.weight", p)[1],
            out_channels=_shape(state, "decoder.conv_out.weight", p)[0],
            latent_channels=_shape(state, "decoder.conv_in.weight", p)[1],
            channels=channels,
            layers_per_block=len(layers),
            norm_groups=_norm_groups(channels, "VAE"),
            mid_attention="encoder.mid.attn_1.q.weight" in state,
            use_quant_conv="quant_conv.weight" in state,
            use_post_quant_conv="post_quant_conv.weight" in state,
            scaling_factor=SD1_VAE_SCALING_FACTOR,
            sample_size=512,
        )
    except ConfigError as e:
        raise WeightsError(f"the VAE tensors describe no valid VAE: {e}") from None


def infer_text_encoder_config(state: dict[str, Tensor], tokenizer: ClipTokenizer | None = None) -> TextEncoderConfig:
    """A CLIP text-encoder config from reference-named tensors (``cond_stage_model.transformer.text_model.``
    removed). Heads are CLIP's 64 wide; activation quick-GELU (OpenAI CLIP, SD-1.x); special-token ids from
    ``tokenizer`` when given, else CLIP's (the last two ids)."""
    p = TEXT_ENCODER_PREFIX
    vocab, hidden = _shape(state, "embeddings.token_embedding.weight", p)
    layers = _indices(state, r"encoder\.layers\.(\d+)\.layer_norm1\.weight")
    if tokenizer is not None:
        ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    else:
        ids = {"bos_id": vocab - 2, "eos_id": vocab - 1, "pad_id": vocab - 1}
    try:
        return TextEncoderConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=len(layers),
            num_heads=hidden // 64 if hidden % 64 == 0 else 1,
            mlp_size=_shape(state, "encoder.layers.0.mlp.fc1.weight", p)[0],
            max_positions=_shape(state, "embeddings.position_embedding.weight", p)[0],
            activation="quick_gelu",
            **ids,
        )
    except ConfigError as e:
        raise WeightsError(f"the text-encoder tensors describe no valid CLIP text encoder: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class SingleFileParts:
    """What a single file holds, in our terms: each network's config and state dict (our parameter names;
    tensors owned, contiguous and cast as asked) and the sampler. The VAE is always float32. A pipeline is
    assembled from these by ``pipelines.loading``; :func:`save_single_file` writes them back."""

    unet_config: UNetConfig
    unet: dict[str, Tensor]
    vae_config: VAEConfig
    vae: dict[str, Tensor]
    text_encoder_config: TextEncoderConfig
    text_encoder: dict[str, Tensor]
    sampler: SamplerConfig


def read_single_file_parts(
    path: str | os.PathLike,
    tokenizer: ClipTokenizer,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = torch.float32,
) -> SingleFileParts:
    """Read a single-file SD-1.x checkpoint (safetensors; a pickle only with ``allow_pickle``, through
    ``torch.load(weights_only=True)``) into :class:`SingleFileParts`.

    Network sizes are inferred from the tensor shapes (or read from the ``diffusekit.*`` metadata of files
    written by :func:`save_single_file`); the sampler is SD-1.x's PNDM schedule. ``tokenizer`` gives the text
    encoder's special-token ids and must fit its vocabulary. The U-Net and text encoder are cast to ``dtype``
    (None: the dtype the file stores its U-Net in). A safetensors file is read one tensor at a time, each cast
    as it is read. Missing, unexpected, mis-shaped or non-finite tensors, and two different copies of the text
    encoder, raise WeightsError naming the file."""
    path = require_file(path, "checkpoint file")
    kind = sniff_format(path)
    if kind == "pickle":
        state, metadata = _read_pickle(path, allow_pickle), {}
        _drop_duplicate_text_encoder(state, state.__getitem__, path)
        _normalize_keys(state)
        parts = _parts(state, state.pop, metadata, tokenizer, path=path, dtype=dtype)
        state.clear()  # what is left are ignored keys (training buffers, EMA copies)
        return parts
    if kind is None and path.suffix.lower() != ".safetensors":
        raise not_a_weights_file(path, pickles=True)
    with _LazySafetensors(path) as lazy:  # a .safetensors name with other content gets the reader's message
        return _parts(lazy.tensors, lazy.read, lazy.metadata, tokenizer, path=path, dtype=dtype)


def read_single_file(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All the tensors of a single-file checkpoint under the file's own keys, and its safetensors metadata
    (empty for pickles): what ``diffusekit convert`` copies from one file to another.

    The kind of file is told from its first bytes. Pickles are refused unless ``allow_pickle``, then read
    with ``torch.load(weights_only=True, map_location="cpu")``, taking the nested ``state_dict`` when there is
    one. Non-finite floating-point tensors are refused in both."""
    path = require_file(path, "checkpoint file")
    kind = sniff_format(path)
    if kind == "pickle":
        return _read_pickle(path, allow_pickle), {}
    if kind is None and path.suffix.lower() != ".safetensors":
        raise not_a_weights_file(path, pickles=True)
    with SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.keys()}, f.metadata


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if not allow_pickle:
        raise pickle_refused(path, offered=True)
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for disallowed objects, RuntimeError / EOFError for corrupt files
        raise WeightsError(
            f"{path}: could not be read as plain tensors ({_pickle_reason(e)}). With --allow-pickle diffusekit "
            "reads pickles with torch.load(weights_only=True), which refuses any Python object besides tensors "
            "and plain containers, and never runs the file's code. Save the weights as .safetensors in the "
            "program that wrote this file, or get a .safetensors release of the model"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of tensors (or one under 'state_dict'), got {type(data).__name__}")
    state = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    for key, value in state.items():
        check_finite(value, key, path)
    return state


def _pickle_reason(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to load it unsafely: the
    object it found ("Unsupported global: GLOBAL pathlib.PosixPath") or the kind of failure."""
    text = str(error)
    found = re.search(r"Unsupported (?:global|operand)[^\n]*?(?= was not|\.?$)", text, re.MULTILINE)
    if found:
        return found.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first or "Weights only" in first:  # torch's advice, not the reason
        return f"{type(error).__name__}: it holds objects that are not tensors"
    return f"{type(error).__name__}: {first.split('. ')[0][:200]}" if first else type(error).__name__


_OLD_TEXT_PREFIX = "cond_stage_model.transformer."  # early files: the text encoder without ``text_model.``


def _drop_duplicate_text_encoder(tensors: dict[str, Tensor], read: Callable[[str], Tensor], path: Path) -> None:
    """Files that hold the text encoder twice, under ``cond_stage_model.transformer.text_model.*`` and the
    older ``cond_stage_model.transformer.*`` names: refuse two copies that differ (which one the model was
    trained with cannot be told); keep the ``text_model.`` copy of equal ones, with a warning that says so.
    ``tensors`` may hold meta tensors; ``read(file key)`` gives the data and must not consume it."""
    pairs = {}
    for key in tensors:
        if key.startswith(_OLD_TEXT_PREFIX) and not key.startswith(TEXT_ENCODER_PREFIX):
            new = TEXT_ENCODER_PREFIX + key[len(_OLD_TEXT_PREFIX) :]
            if new in tensors:
                pairs[key] = new
    if not pairs:
        return
    differ = []
    for old, new in pairs.items():
        if _IGNORED_KEYS.fullmatch(new):  # buffers such as position_ids: not weights, never compared
            continue
        a, b = tensors[old], tensors[new]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(read(old), read(new)):
            differ.append(old)
    if differ:
        raise WeightsError(
            f"{path}: holds the text encoder twice, under {TEXT_ENCODER_PREFIX}* and the older {_OLD_TEXT_PREFIX}* "
            f"names, and the copies differ ({_few(differ)}); which one the model was trained with cannot be told. "
            "Keep one copy (write the file again without the other's keys)"
        )
    for old in pairs:
        del tensors[old]
    warnings.warn(
        f"{path}: holds the text encoder twice, under {TEXT_ENCODER_PREFIX}* and the older {_OLD_TEXT_PREFIX}* "
        f"names ({len(pairs)} tensors each); the copies are equal, using the {TEXT_ENCODER_PREFIX}* one",
        stacklevel=3,
    )


def _normalize_keys(state: dict[str, Tensor]) -> dict[str, str]:
    """Rename, in place, the text-encoder keys of older files (``cond_stage_model.transformer.embeddings...``,
    without ``text_model.``); returns {new name: the file's name} for what was renamed. Run after
    :func:`_drop_duplicate_text_encoder`, so that no new name is already taken."""
    renamed = {}
    for k in [k for k in state if k.startswith(_OLD_TEXT_PREFIX) and not k.startswith(TEXT_ENCODER_PREFIX)]:
        new = TEXT_ENCODER_PREFIX + k[len(_OLD_TEXT_PREFIX) :]
        assert new not in state, new
        state[new] = state.pop(k)
        renamed[new] = k
    return renamed


def _few(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _config_from_metadata(metadata: dict[str, str], key: str, parse: Callable[[dict], Any], path: Path) -> Any:
    """Our config stored under ``key`` in the file's metadata, or None when absent."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("not a JSON object")
        return parse(data)
    except (ValueError, TypeError, RecursionError, DiffusekitError) as e:
        raise WeightsError(f"{path}: invalid {key!r} config in the file's metadata ({e})") from None


def _text_config_from_dict(d: dict) -> TextEncoderConfig:
    known = {f.name for f in fields(TextEncoderConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown text encoder config keys {unknown}")
    try:
        # the round trip through the reference form applies its bounds and type checks
        return text_encoder_from_diffusers(text_encoder_to_diffusers(TextEncoderConfig(**d)))
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid text encoder config in the file's metadata: {e}") from None


def _take(
    read: Callable[[str], Tensor], key_map: KeyMap, expected: dict[str, Tensor], *, dtype: torch.dtype, source: Path
) -> dict[str, Tensor]:
    """The network's state dict under our names, read tensor by tensor with ``read(file key)`` and cast as it
    is read, so that at most one of the file's tensors is held beside the result at a time. ``expected``: the
    network's state dict on the meta device (which tensors are floating point)."""
    owned = {}
    for ours, theirs in key_map.names.items():
        v = read(theirs)
        if expected[ours].is_floating_point() and not v.is_floating_point():
            raise WeightsError(f"{source}: tensor {theirs!r} has dtype {v.dtype}; a floating-point weight was expected")
        if ours in key_map.conv_weights and v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]  # a 1x1 convolution in the file, a linear layer here
        w = v.to(dtype) if v.is_floating_point() else v
        if w.data_ptr() == v.data_ptr():  # not copied yet: take an aligned, owned copy (see io.models)
            w = w.clone(memory_format=torch.contiguous_format)
        owned[ours] = w.contiguous()
        del v, w
    assert set(owned) == set(expected)
    return owned


def _check_keys(state: dict[str, Tensor], maps: list[tuple[KeyMap, dict[str, Tensor]]], path: Path) -> None:
    """WeightsError naming the file and a few keys unless ``state`` holds exactly the expected tensors."""
    expected: dict[str, tuple[int, ...]] = {}
    convs: set[str] = set()
    for key_map, shapes in maps:
        for ours, theirs in key_map.names.items():
            expected[theirs] = tuple(shapes[ours].shape)
            if ours in key_map.conv_weights:
                convs.add(theirs)
    present = {k for k in state if not _IGNORED_KEYS.fullmatch(k)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = []
    for k in sorted(set(expected) & present):
        shape = tuple(state[k].shape)
        if shape != expected[k] and not (k in convs and shape == (*expected[k], 1, 1)):
            wrong.append(f"{k} (file {shape}, expected {expected[k]})")
    if not (missing or unexpected or wrong):
        return
    problems = []
    for prefix, what in _OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in unexpected):
            problems.append(f"this looks like {what}")
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_few(wrong)}")
    raise WeightsError(f"{path} does not fit a Stable Diffusion 1.x single-file layout: " + "; ".join(problems))


def _component(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class _LazySafetensors:
    """A safetensors file opened for reading one tensor at a time: ``tensors`` holds meta tensors (shape and
    dtype, no data) for config inference and checks, under the names :func:`_normalize_keys` gives them,
    ``read(key)`` the data of one, ``metadata`` the header's string metadata. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _LazySafetensors:
        self._file = SafetensorsFile(self.path).__enter__()
        try:
            self.metadata = self._file.metadata
            self.tensors = {key: self._file.meta(key) for key in self._file.keys()}
            _drop_duplicate_text_encoder(self.tensors, self._file.read, self.path)
            self._renamed = _normalize_keys(self.tensors)
        except BaseException:
            self._file.__exit__()
            raise
        return self

    def read(self, key: str) -> Tensor:
        return self._file.read(self._renamed.get(key, key))

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)


def read_single_file_shapes(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A ``.safetensors`` single file's tensors as meta tensors (shapes and dtypes only; no data is read) and its
    metadata: enough to inspect a checkpoint, infer its configs or find its :func:`stored_dtype`."""
    with _LazySafetensors(require_file(path, "checkpoint file")) as lazy:
        return lazy.tensors, lazy.metadata


def single_file_family(keys: Iterable[str]) -> str | None:
    """What a single file's keys say it is when it is not SD-1.x (a sentence for messages), or None."""
    keys = list(keys)
    for prefix, what in _OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            return what
    return None


def _parts(
    state: dict[str, Tensor],
    read: Callable[[str], Tensor],
    metadata: dict[str, str],
    tokenizer: ClipTokenizer,
    *,
    path: Path,
    dtype: torch.dtype | None,
) -> SingleFileParts:
    """The parts that ``state`` (the file's tensors, or meta tensors with their shapes and dtypes; keys
    normalized) describes, filled through ``read`` (a file key -> its tensor)."""
    other = single_file_family(state)
    if other is not None:
        raise WeightsError(f"{path}: this is {other}")

    def config(key: str, parse: Callable[[dict], Any], infer: Callable[[], Any]) -> Any:
        stored = _config_from_metadata(metadata, _META_KEYS[key], parse, path)
        if stored is not None:
            return stored
        try:
            return infer()
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None

    unet_config = config("unet", UNetConfig.from_dict, lambda: infer_unet_config(_component(state, UNET_PREFIX)))
    vae_config = config("vae", VAEConfig.from_dict, lambda: infer_vae_config(_component(state, VAE_PREFIX)))
    text_config = config(
        "text",
        _text_config_from_dict,
        lambda: infer_text_encoder_config(_component(state, TEXT_ENCODER_PREFIX), tokenizer),
    )
    sampler = config("sampler", SamplerConfig.from_dict, lambda: SamplerConfig.from_reference(SD1_SCHEDULER))
    ids = max(tokenizer.vocab.values())
    if ids >= text_config.vocab_size:
        raise WeightsError(
            f"the tokenizer has token ids up to {ids}, but the text encoder in {path} knows only "
            f"{text_config.vocab_size} tokens; use the tokenizer this model was trained with"
        )
    dtype = dtype or stored_dtype(state)
    maps = [
        (unet_key_map(unet_config), UNet, unet_config, dtype),
        (vae_key_map(vae_config), AutoencoderKL, vae_config, torch.float32),
        (text_encoder_key_map(text_config), ClipTextEncoder, text_config, dtype),
    ]
    with torch.device("meta"):
        shapes = [build(cfg).state_dict() for _, build, cfg, _ in maps]
    _check_keys(state, [(m[0], s) for m, s in zip(maps, shapes)], path)
    unet, vae, text = (
        _take(read, key_map, expected, dtype=dt, source=path) for (key_map, _, _, dt), expected in zip(maps, shapes)
    )
    return SingleFileParts(unet_config, unet, vae_config, vae, text_config, text, sampler)


def stored_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The dtype a single file stores its U-Net in (float32 when it has no floating U-Net tensor)."""
    return next((v.dtype for k, v in state.items() if k.startswith(UNET_PREFIX) and v.is_floating_point()),
                torch.float32)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Writing


def to_single_file_state_dict(parts: SingleFileParts, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The three networks' tensors under their single-file (CompVis) keys, contiguous; ``dtype`` casts floating
    tensors."""
    out: dict[str, Tensor] = {}
    networks = [
        (parts.unet, unet_key_map(parts.unet_config)),
        (parts.vae, vae_key_map(parts.vae_config)),
        (parts.text_encoder, text_encoder_key_map(parts.text_encoder_config)),
    ]
    for state, key_map in networks:
        unknown = sorted(set(state) - set(key_map.names))
        if unknown:
            raise WeightsError(f"parameters with no single-file name: {_few(unknown)}")
        for ours, v in state.items():
            v = v.detach().cpu()
            if ours in key_map.conv_weights:
                v = v[:, :, None, None]  # stored as a 1x1 convolution, as LDM defines it
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[key_map.names[ours]] = v.contiguous()  # files hold row-major tensors; ours may be channels-last
    return out


def save_single_file(parts: SingleFileParts, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write ``parts`` as one ``.safetensors`` file in the SD-1.x single-file layout (atomically), with our
    exact configs in its metadata so that :func:`read_single_file_parts` rebuilds the same networks. No
    tokenizer is stored (no single file carries one). ``dtype`` (e.g. ``torch.float16``) casts the weights."""
    from diffusekit import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"single-file output must end in .safetensors, got {path}")
    metadata = {
        "format": "pt",
        "diffusekit_version": __version__,
        _META_KEYS["unet"]: json.dumps(parts.unet_config.to_dict()),
        _META_KEYS["vae"]: json.dumps(parts.vae_config.to_dict()),
        _META_KEYS["text"]: json.dumps(parts.text_encoder_config.to_dict()),
        _META_KEYS["sampler"]: json.dumps(parts.sampler.to_dict()),
    }
    save_weights(to_single_file_state_dict(parts, dtype), path, metadata=metadata)


__all__ = [
    "KeyMap",
    "PICKLE_SUFFIXES",
    "SD1_SCHEDULER",
    "SingleFileParts",
    "TEXT_ENCODER_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "infer_text_encoder_config",
    "infer_unet_config",
    "infer_vae_config",
    "read_single_file",
    "read_single_file_parts",
    "read_single_file_shapes",
    "save_single_file",
    "single_file_family",
    "stored_dtype",
    "text_encoder_key_map",
    "to_single_file_state_dict",
    "unet_key_map",
    "vae_key_map",
]
