"""Single-file Stable Diffusion 1.x checkpoints in the original CompVis / latent-diffusion key layout.

One ``.safetensors`` file holds the three networks under these prefixes:

* ``model.diffusion_model.``: the U-Net (``time_embed``, ``input_blocks``, ``middle_block``,
  ``output_blocks``, ``out``; residual blocks named ``in_layers`` / ``emb_layers`` / ``out_layers``);
* ``first_stage_model.``: the VAE (``encoder.down.{level}.block.{i}``, ``mid.block_1`` / ``attn_1`` /
  ``block_2``, ``decoder.up.{level}``; the mid attention's q/k/v/proj_out stored as 1x1 convolutions);
* ``cond_stage_model.transformer.text_model.``: the CLIP text encoder (its names are mapped by ``io.text``).

The key mapping between these names and ours, and the configs inferred from tensor shapes, live in
``io.single_file_layout``; the same mapping runs both ways (:func:`read_single_file_parts` /
:func:`save_single_file`). This module deals in configs and state dicts only (:class:`SingleFileParts`);
``pipelines.loading`` builds the pipeline from them.

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
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusekit.errors import ConfigError, DiffusekitError, WeightsError
from diffusekit.io.scheduler_config import scheduler_from_diffusers, scheduler_to_diffusers
from diffusekit.io.single_file_layout import (
    IGNORED_KEYS,
    OTHER_FAMILIES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    KeyMap,
    infer_text_encoder_config,
    infer_unet_config,
    infer_vae_config,
    single_file_family,
    text_encoder_key_map,
    unet_key_map,
    vae_key_map,
)
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

# The scheduler every SD-1.x model was released with, as its diffusers ``scheduler_config.json`` says it
SD1_SCHEDULER = scheduler_to_diffusers(dataclasses.replace(SD1, reference_rules=True))
_META_KEYS = {"unet": "diffusekit.unet", "vae": "diffusekit.vae", "text": "diffusekit.text_encoder",
              "sampler": "diffusekit.sampler"}  # fmt: skip

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
        state, metadata = read_pickle(path, allow_pickle), {}
        _drop_duplicate_text_encoder(state, state.__getitem__, path)
        _normalize_keys(state)
        parts = _parts(state, state.pop, metadata, tokenizer, path=path, dtype=dtype)
        state.clear()  # what is left are ignored keys (training buffers, EMA copies)
        return parts
    if kind is None and path.suffix.lower() != ".safetensors":
        raise not_a_weights_file(path, pickles=True)
    with LazySafetensors(path) as lazy:  # a .safetensors name with other content gets the reader's message
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
        return read_pickle(path, allow_pickle), {}
    if kind is None and path.suffix.lower() != ".safetensors":
        raise not_a_weights_file(path, pickles=True)
    with SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.keys()}, f.metadata


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
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
        if IGNORED_KEYS.fullmatch(new):  # buffers such as position_ids: not weights, never compared
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


def config_from_metadata(
    metadata: dict[str, str], key: str, parse: Callable[[dict], Any], infer: Callable[[], Any], path: Path
) -> Any:
    """Our config stored under ``key`` in the file's metadata; a file without one (any other tool's) gets
    ``infer()``, the config read from its tensors' shapes, whose WeightsError then names the file."""
    text = metadata.get(key)
    if text is None:
        try:
            return infer()
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("not a JSON object")
        return parse(data)
    except (ValueError, TypeError, RecursionError, DiffusekitError) as e:
        raise WeightsError(f"{path}: invalid {key!r} config in the file's metadata ({e})") from None


def text_config_from_dict(d: dict) -> TextEncoderConfig:
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


def take(
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


def expected_keys(maps: list[tuple[KeyMap, dict[str, Tensor]]]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({file key: shape}, {keys stored as 1x1 convolutions}) of (key map, meta state dict) pairs."""
    expected, convs = {}, set()
    for key_map, shapes in maps:
        for ours, theirs in key_map.names.items():
            expected[theirs] = tuple(shapes[ours].shape)
            if ours in key_map.conv_weights:
                convs.add(theirs)
    return expected, convs


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], convs: set[str], path: Path, *,
               layout: str = "a Stable Diffusion 1.x single-file layout", ignored: re.Pattern = IGNORED_KEYS,
               families: dict[str, str] = OTHER_FAMILIES) -> None:  # fmt: skip
    """WeightsError naming the file, ``layout`` and a few keys unless ``state`` holds exactly the ``expected``
    tensors (``ignored`` keys aside); unexpected keys under a prefix of ``families`` say what the file is."""
    present = {k for k in state if not ignored.fullmatch(k)}
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
    for prefix, what in families.items():
        if any(k.startswith(prefix) for k in unexpected):
            problems.append(f"this looks like {what}")
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_few(wrong)}")
    raise WeightsError(f"{path} does not fit {layout}: " + "; ".join(problems))


def _component(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class LazySafetensors:
    """A safetensors file opened for reading one tensor at a time: ``tensors`` holds meta tensors (shape and
    dtype, no data) for config inference and checks, under the names :func:`_normalize_keys` gives them,
    ``read(key)`` the data of one, ``metadata`` the header's string metadata. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> LazySafetensors:
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
    with LazySafetensors(require_file(path, "checkpoint file")) as lazy:
        return lazy.tensors, lazy.metadata


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
        return config_from_metadata(metadata, _META_KEYS[key], parse, infer, path)

    unet_config = config("unet", UNetConfig.from_dict, lambda: infer_unet_config(_component(state, UNET_PREFIX)))
    vae_config = config("vae", VAEConfig.from_dict, lambda: infer_vae_config(_component(state, VAE_PREFIX)))
    text_config = config(
        "text",
        text_config_from_dict,
        lambda: infer_text_encoder_config(_component(state, TEXT_ENCODER_PREFIX), tokenizer),
    )
    sampler = config("sampler", SamplerConfig.from_dict, lambda: scheduler_from_diffusers(SD1_SCHEDULER))
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
    check_keys(state, *expected_keys([(m[0], s) for m, s in zip(maps, shapes)]), path)
    unet, vae, text = (
        take(read, key_map, expected, dtype=dt, source=path) for (key_map, _, _, dt), expected in zip(maps, shapes)
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
    configs = {"unet": parts.unet_config.to_dict(), "vae": parts.vae_config.to_dict(),
               "text": parts.text_encoder_config.to_dict(), "sampler": parts.sampler.to_dict()}  # fmt: skip
    path = Path(path)
    save_weights(to_single_file_state_dict(parts, dtype), path, metadata=file_metadata(path, configs, _META_KEYS))


def file_metadata(path: Path, configs: dict[str, dict], keys: dict[str, str]) -> dict[str, str]:
    """The safetensors header metadata of a single file we write: our version and each config as JSON under
    its ``keys`` name. Refuses an output name that does not end in .safetensors."""
    from diffusekit import __version__

    if path.suffix != ".safetensors":
        raise ConfigError(f"single-file output must end in .safetensors, got {path}")
    meta = {keys[name]: json.dumps(config, allow_nan=False) for name, config in configs.items()}
    return {"format": "pt", "diffusekit_version": __version__, **meta}


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
