"""Reading and writing the CLIP text encoder and tokenizer in the reference on-disk layout.

Text encoder folder: ``config.json`` (a ``CLIPTextModel`` config) + ``model.safetensors`` (or a sharded
``model.safetensors.index.json``). Tokenizer folder: ``vocab.json`` + ``merges.txt`` (+
``tokenizer_config.json`` / ``special_tokens_map.json``). A diffusers model root (with ``text_encoder/`` and
``tokenizer/`` subfolders) is accepted too.

The state-dict key mapping between our module names and the reference's lives here, and only here:
``text_encoder_to_diffusers_state_dict`` / ``text_encoder_from_diffusers_state_dict`` (also used for single-file
SD-1.x checkpoints, whose text-encoder keys start with ``cond_stage_model.transformer.text_model.``), and
``from_open_clip_state_dict`` for SD-2.x single files (OpenCLIP names under ``cond_stage_model.model.``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.text_encoder_config import text_encoder_from_diffusers, text_encoder_to_diffusers
from diffusekit.io.weights import load_weights, missing_weights, read_json, save_weights, write_json, write_text
from diffusekit.limits import MAX_POSITIONS
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.tokenizer import BOS_TOKEN, EOS_TOKEN, ClipTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
MERGES_HEADER = "#version: 0.2"

# Prefix under which real SD-1.x/2.x ``text_encoder/model.safetensors`` files store the weights; newer
# reference versions write the same names without it. We read both and write this one.
REFERENCE_PREFIX = "text_model."
SINGLE_FILE_PREFIX = "cond_stage_model.transformer.text_model."  # SD-1.x single files (HF CLIP names)
OPEN_CLIP_SINGLE_FILE_PREFIX = "cond_stage_model.model."  # SD-2.x single files (OpenCLIP names)

# ---------------------------------------------------------------------------------------------------------
# Key mapping: (our name, reference name) prefixes. Per-layer entries are relative to the layer prefix.
_TOP_LEVEL = [
    ("token_embedding.", "embeddings.token_embedding."),
    ("position_embedding.", "embeddings.position_embedding."),
    ("final_norm.", "final_layer_norm."),
]
_LAYER = ("blocks.{}.", "encoder.layers.{}.")
_PER_LAYER = [
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.q.", "self_attn.q_proj."),
    ("attn.k.", "self_attn.k_proj."),
    ("attn.v.", "self_attn.v_proj."),
    ("attn.out.", "self_attn.out_proj."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
# OpenCLIP's per-layer names (SD-2.x single files); its fused q/k/v projection is split in code below.
_OPEN_CLIP_PER_LAYER = [
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("attn.out_proj.", "attn.out."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]
# Reference buffers that carry no learned state (older versions saved the position index table).
_IGNORED_REFERENCE_KEYS = {"embeddings.position_ids"}
# Outside the ``text_model.`` prefix in the reference (``CLIPTextModelWithProjection``): the same name in both.
_UNPREFIXED = ("text_projection.",)


def _rename(key: str, forward: bool) -> str | None:
    """Map one key ours -> reference (``forward``) or back; None when it matches no entry."""
    src, dst = (0, 1) if forward else (1, 0)
    for pair in _TOP_LEVEL:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]) :]
    layer_re = re.escape(_LAYER[src]).replace(r"\{\}", r"(\d+)")
    m = re.match(layer_re, key)
    if m:
        rest = key[m.end() :]
        for pair in _PER_LAYER:
            if rest.startswith(pair[src]):
                return _LAYER[dst].format(m.group(1)) + pair[dst] + rest[len(pair[src]) :]
    return None


def text_encoder_to_diffusers_state_dict(
    state: dict[str, torch.Tensor], prefix: str = REFERENCE_PREFIX
) -> dict[str, torch.Tensor]:
    """Our ``ClipTextEncoder`` state dict -> reference names, each preceded by ``prefix``
    (``"text_model."`` for a ``text_encoder/`` folder, ``SINGLE_FILE_PREFIX`` for a single-file checkpoint).
    Raises WeightsError for a key we do not know."""
    out = {}
    for key, value in state.items():
        if key.startswith(_UNPREFIXED):
            out[key] = value
            continue
        ref = _rename(key, forward=True)
        if ref is None:
            raise WeightsError(f"text encoder parameter {key!r} has no reference name")
        out[prefix + ref] = value
    return out


def text_encoder_from_diffusers_state_dict(
    state: dict[str, torch.Tensor], prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Reference-named weights -> our names.

    ``prefix=None``: the keys are a text encoder's alone; a leading ``"text_model."`` is removed where present.
    ``prefix="..."``: only the keys starting with it are taken (e.g. ``SINGLE_FILE_PREFIX`` from a whole SD
    checkpoint), the rest ignored. Keys that map to nothing are returned unchanged, so a strict load can
    name them; the ``position_ids`` buffer of older files is dropped.
    """
    out = {}
    for key, value in state.items():
        if prefix is None:
            name = key.removeprefix(REFERENCE_PREFIX)
        elif key.startswith(prefix):
            name = key[len(prefix) :]
        else:
            continue
        if name in _IGNORED_REFERENCE_KEYS:
            continue
        ours = _rename(name, forward=False)
        out[key if ours is None else ours] = value
    return out


def from_open_clip_state_dict(
    state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_SINGLE_FILE_PREFIX, num_layers: int | None = None
) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights (SD-2.x single-file checkpoints, under ``cond_stage_model.model.``) -> our
    names. Only keys under ``prefix`` are read; ``visual.*``, ``text_projection`` and ``logit_scale`` are not
    part of the text encoder and are ignored, as are resblocks at index >= ``num_layers`` (SD-2.x uses 23 of
    the 24). The fused ``attn.in_proj_*`` (q, k, v stacked on dim 0) is split into q, k, v."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in ("token_embedding.weight", "positional_embedding"):
            out[name.replace("positional_embedding", "position_embedding.weight")] = value
        elif name.startswith("ln_final."):
            out["final_norm." + name[len("ln_final.") :]] = value
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)", name):
            layer, rest = int(m.group(1)), m.group(2)
            if num_layers is not None and layer >= num_layers:
                continue
            block = f"blocks.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for proj, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{block}attn.{proj}.{kind}"] = part
                continue
            for theirs, ours in _OPEN_CLIP_PER_LAYER:
                if rest.startswith(theirs):
                    out[block + ours + rest[len(theirs) :]] = value
                    break
            else:
                out[key] = value  # unknown: left for a strict load to name
        elif name.startswith(("visual.", "text_projection", "logit_scale")) or name == "attn_mask":
            continue
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Text encoder folders


def _resolve(folder: str | os.PathLike, marker: str, subfolder: str) -> Path:
    """``folder`` itself, or its ``subfolder`` when ``folder`` is a model root without ``marker``.
    Missing folders are named by what was looked for (``text_encoder`` / ``tokenizer`` folder)."""
    folder = Path(folder)
    what = subfolder.replace("_", " ")
    if folder.is_file():
        raise WeightsError(f"{folder}: is a file; a {what} folder (or a model folder holding {subfolder}/) "
                           "was expected")  # fmt: skip
    if not folder.is_dir():
        raise WeightsError(f"{what} folder not found: {folder}")
    if not (folder / marker).exists() and (folder / subfolder / marker).exists():
        return folder / subfolder
    return folder


def _load_state(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    single, index = folder / WEIGHTS_FILE, folder / WEIGHTS_INDEX_FILE
    if single.is_file():
        return load_weights(single), single
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: expected a 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        shards = list(weight_map.values())
        for shard in shards:  # plain file names in this folder, checked before any is read
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise WeightsError(f"{index}: invalid shard name {shard!r}")
        for shard in sorted(set(shards)):
            state.update(load_weights(folder / shard))
        return state, index
    raise missing_weights(single)


def _format_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)``, after checking names and shapes ourselves so that a mismatch
    raises WeightsError naming ``source`` and a few keys. Works for a model built on the meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise WeightsError(f"{source}: weights do not match the config; " + "; ".join(parts))
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"{source}: shape mismatch: {_format_keys(wrong)}")
    bad_dtype = [k for k, v in state.items() if not v.dtype.is_floating_point]
    if bad_dtype:
        raise WeightsError(f"{source}: non-floating-point weights: {_format_keys(bad_dtype)}")
    # a model built on the meta device takes the loaded tensors as they are; a real one copies them in
    model.load_state_dict(state, strict=True, assign=any(p.is_meta for p in model.parameters()))


def load_text_encoder(
    folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ClipTextEncoder:
    """Load a ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors``) as a ClipTextEncoder in eval
    mode. Missing/unexpected weights or wrong shapes raise WeightsError; a bad config raises ConfigError."""
    folder = _resolve(folder, CONFIG_FILE, "text_encoder")
    config_path = folder / CONFIG_FILE
    try:
        config = text_encoder_from_diffusers(read_json(config_path))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    state, source = _load_state(folder)
    with torch.device("meta"):
        model = ClipTextEncoder(config)
    load_state_strict(model, text_encoder_from_diffusers_state_dict(state), source)
    return model.to(device=device, dtype=dtype).eval()


def save_text_encoder(model: ClipTextEncoder, folder: str | os.PathLike, *, prefix: str = REFERENCE_PREFIX) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the reference layout (keys ``text_model.*``, as
    SD-1.x/2.x folders carry them; pass ``prefix=""`` for the unprefixed names newer versions write)."""
    folder = Path(folder)
    state = text_encoder_to_diffusers_state_dict(model.state_dict(), prefix=prefix)
    save_weights(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    write_json(text_encoder_to_diffusers(model.config), folder / CONFIG_FILE)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer folders


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise WeightsError(f"tokenizer vocabulary not found: {path}")
    vocab = read_json(path)
    bad = [k for k, v in vocab.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise WeightsError(f"{path}: token ids must be non-negative integers; bad entries: {_format_keys(bad)}")
    if len(set(vocab.values())) != len(vocab):
        raise WeightsError(f"{path}: token ids are not unique")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise WeightsError(f"tokenizer merges file not found: {path}")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:  # unreadable: permissions, I/O errors, special files
        raise WeightsError(f"{path}: cannot read the file ({e.strerror or e})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise WeightsError(f"{path}, line {number}: expected two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _token_text(value: object, name: str, path: Path) -> str:
    """A special token as configs spell it: a string, or an object with a ``content`` string."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise WeightsError(f"{path}: {name} must be a token string, got {value!r}")
    return value


def load_tokenizer(folder: str | os.PathLike) -> ClipTokenizer:
    """Build a ClipTokenizer from a reference ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``; bos, eos,
    pad, unk, ``model_max_length`` and ``do_lower_case`` from ``tokenizer_config.json`` and
    ``special_tokens_map.json`` when present, else CLIP's defaults). ``tokenizer.json`` is not needed."""
    folder = _resolve(folder, VOCAB_FILE, "tokenizer")
    vocab = _read_vocab(folder / VOCAB_FILE)
    merges = _read_merges(folder / MERGES_FILE)
    settings: dict[str, object] = {}
    sources: dict[str, Path] = {}
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):  # the special-tokens map wins
        path = folder / name
        if path.exists():
            data = read_json(path)
            settings.update(data)
            sources.update(dict.fromkeys(data, path))
    tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    for name in tokens:
        if settings.get(name) is not None:
            tokens[name] = _token_text(settings[name], name, sources[name])
    max_length = settings.get("model_max_length", 77)
    # The reference writes a huge sentinel (1e30) when no length is set; CLIP's context is 77 tokens.
    if isinstance(max_length, float) and max_length.is_integer():
        max_length = int(max_length)
    if isinstance(max_length, int) and max_length > 1_000_000:
        max_length = 77
    if isinstance(max_length, int) and max_length > MAX_POSITIONS:  # every prompt is padded to this length
        raise ConfigError(
            f"{sources['model_max_length']}: model_max_length={max_length} is too large; allowed: 2..{MAX_POSITIONS} "
            "(or the reference's 'unset' sentinel, above 1000000)"
        )
    lowercase = settings.get("do_lower_case", True)
    try:
        return ClipTokenizer(vocab, merges, **tokens, model_max_length=max_length, lowercase=lowercase is not False)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None


def save_tokenizer(tok: ClipTokenizer, folder: str | os.PathLike) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    folder = Path(folder)
    write_json(tok.vocab, folder / VOCAB_FILE)
    merges = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in tok.merges)]) + "\n"
    write_text(merges, folder / MERGES_FILE)
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    if tok.unk_token is not None:
        special["unk_token"] = tok.unk_token
    write_json(special, folder / SPECIAL_TOKENS_FILE)
    config = {
        **special,
        "model_max_length": tok.model_max_length,
        "do_lower_case": tok.lowercase,
        "tokenizer_class": "CLIPTokenizer",
    }
    write_json(config, folder / TOKENIZER_CONFIG_FILE)


__all__ = [
    "REFERENCE_PREFIX",
    "OPEN_CLIP_SINGLE_FILE_PREFIX",
    "SINGLE_FILE_PREFIX",
    "from_open_clip_state_dict",
    "text_encoder_from_diffusers_state_dict",
    "load_state_strict",
    "load_text_encoder",
    "load_tokenizer",
    "save_text_encoder",
    "save_tokenizer",
    "text_encoder_to_diffusers_state_dict",
]
