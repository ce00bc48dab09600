"""The SD-1.x single-file (CompVis / latent-diffusion) key layout: which of our parameters is which key of
the file (:func:`unet_key_map`, :func:`vae_key_map`, :func:`text_encoder_key_map`), and the network configs
inferred from the file's tensor shapes (:func:`infer_unet_config`, ...). ``io.single_file`` reads and writes
files with these; the mapping lives here and only here.

``_unet_modules`` and ``_vae_modules`` list, for a config, which of our modules is which module of the file,
and two small tables rename the parameters inside a residual block or attention layer; the same mapping runs
both ways. What shapes do not tell (head counts, GroupNorm groups) takes the SD-1.x values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.text import SINGLE_FILE_PREFIX, text_encoder_to_diffusers_state_dict
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.tokenizer import ClipTokenizer
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.networks.vae import AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = SINGLE_FILE_PREFIX  # "cond_stage_model.transformer.text_model."
SD1_UNET_HEADS = 8  # SD-1.x: 8 heads at every level (head size = channels / 8)
SD1_NORM_GROUPS = 32
SD1_VAE_SCALING_FACTOR = 0.18215


# Keys real SD-1.x files carry that are not weights of the three networks: the training noise schedule, the
# EMA copy of the U-Net (``model_ema.*``; the file's main U-Net is used), the autoencoder's training loss and
# CLIP's position-index buffer.
IGNORED_KEYS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar"
    r"|model_ema\..*|first_stage_model\.loss\..*|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids)"
)
# Families we recognise but do not read, with what to say.
OTHER_FAMILIES = {
    "cond_stage_model.model.": "an SD-2.x checkpoint (OpenCLIP text encoder); only SD-1.x single files are read",
    "conditioner.embedders.": "an SDXL checkpoint, read by diffusekit.io.single_file_sdxl (load_pipeline tells "
    "the two apart)",
}
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
        "add_embedding.linear_1": ("label_emb.0.0", _SAME),  # SDXL's added text/time embedding (SGM names)
        "add_embedding.linear_2": ("label_emb.0.2", _SAME),
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


def text_encoder_key_map(config: TextEncoderConfig, prefix: str = TEXT_ENCODER_PREFIX) -> KeyMap:
    """The single-file keys of a CLIP text encoder with this config (the names ``io.text`` gives it, under
    ``prefix``: SD-1.x's ``cond_stage_model.transformer.text_model.``, SDXL's first encoder's
    ``conditioner.embedders.0.transformer.text_model.``)."""
    names = {}
    for k in _meta_state(ClipTextEncoder, config):
        (theirs,) = text_encoder_to_diffusers_state_dict({k: torch.empty(0)}, prefix=prefix)
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


def single_file_family(keys: Iterable[str]) -> str | None:
    """What a single file's keys say it is when it is not SD-1.x (a sentence for messages), or None."""
    keys = list(keys)
    for prefix, what in OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            return what
    return None


__all__ = [
    "IGNORED_KEYS",
    "KeyMap",
    "OTHER_FAMILIES",
    "SD1_NORM_GROUPS",
    "SD1_UNET_HEADS",
    "SD1_VAE_SCALING_FACTOR",
    "TEXT_ENCODER_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "infer_text_encoder_config",
    "infer_unet_config",
    "infer_vae_config",
    "single_file_family",
    "text_encoder_key_map",
    "unet_key_map",
    "vae_key_map",
]
