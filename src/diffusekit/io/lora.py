"""LoRA files: the kohya / A1111 layout and the PEFT layout the reference writes, read into one form and
written back.

**kohya / A1111** (``.safetensors``): per adapted module a stem, ``lora_unet_<module path with "." -> "_">``
(the U-Net in the reference's module names, or in the original CompVis names: ``input_blocks_1_1_proj_in``),
``lora_te_<path>`` (the text encoder, transformers names ``text_model_encoder_layers_0_self_attn_q_proj``) or
``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders); keys ``<stem>.lora_down.weight`` (A),
``<stem>.lora_up.weight`` (B) and ``<stem>.alpha`` (0-d; alpha = r when absent). Module paths contain "_"
themselves, so a stem is found by spelling every module of the model the same way, never by turning "_" back
into ".".

**PEFT** (``pytorch_lora_weights.safetensors``, as the reference's ``save_lora_weights`` writes):
``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` with component ``unet``, ``text_encoder`` or
``text_encoder_2`` (a ``text_model.`` after the component is optional). alpha is not a tensor: the header's
``__metadata__["lora_adapter_metadata"]`` is a JSON object of the peft ``LoraConfig`` fields prefixed by the
component (``"unet.r"``, ``"unet.lora_alpha"``, ``"unet.rank_pattern"``, ``"unet.alpha_pattern"``,
``"unet.use_rslora"``, ...); the scale is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), ``r`` the module's own
rank. No metadata: alpha = r, scale 1.

:func:`read_lora` checks a file completely (pairs, ranks, alphas, unsupported variants) from its header
before reading any tensor; :func:`resolve` maps its module names onto our networks, reusing the state-dict
key maps of :mod:`diffusekit.io.diffusers_keys`, :mod:`diffusekit.io.text` and (CompVis names)
:mod:`diffusekit.io.single_file`; :func:`save_lora` writes either layout.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError, WeightsError, check_choice
from diffusekit.io.diffusers_keys import from_diffusers_state_dict, to_diffusers_state_dict
from diffusekit.io.single_file import UNET_PREFIX, unet_key_map
from diffusekit.io.text import (
    REFERENCE_PREFIX,
    text_encoder_from_diffusers_state_dict,
    text_encoder_to_diffusers_state_dict,
)
from diffusekit.io.weights import (
    SafetensorsFile,
    not_a_weights_file,
    pickle_refused,
    require_file,
    save_weights,
    sniff_format,
)
from diffusekit.limits import MAX_WIDTH
from diffusekit.networks.lora import ADAPTED_LAYERS, LowRank, fitted
from diffusekit.networks.text_encoder import ClipTextEncoder
from diffusekit.networks.unet import UNet

FORMATS = ("kohya", "peft")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"
MAX_SCALE = 1e4  # alpha / rank; community files use up to ~32 (alpha 128 at rank 4)

# kohya stem prefixes -> component
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}  # fmt: skip
_KOHYA_KEY = re.compile(
    r"^(lora_unet_|lora_te_|lora_te1_|lora_te2_)([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.([A-Za-z0-9_.]+)\.(lora_A\.weight|lora_B\.weight|alpha)$")
# keys of adapter variants we do not implement, with their names for the message
_UNSUPPORTED = [
    (re.compile(r"\.hada_"), "LoHa"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)"), "DoRA"),
    (re.compile(r"\.lora_mid\."), "LoCon with a Tucker middle kernel"),
    (re.compile(r"\.(diff|diff_b|lora_[AB]\.bias|lora_up\.bias)$"), "full weight/bias differences"),
    (re.compile(r"\.(oft_|lora_embedding_)"), "OFT / embedding adapters"),
]
_ROLE = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
         "alpha": "alpha"}  # fmt: skip


@dataclass(frozen=True)
class FileModule:
    """One adapted module as a file names it: ``component``, ``target`` (the kohya spelling after the prefix,
    or the PEFT dotted path after the component) and ``stem`` (the file's key without ``.lora_*``/``.alpha``)."""

    component: str
    target: str
    stem: str


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's content in our one form: its updates by module, before matching them to a model."""

    path: Path
    format: str
    modules: dict[FileModule, LowRank]

    @property
    def components(self) -> list[str]:
        return sorted({m.component for m in self.modules})


def _few(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA ``.safetensors`` file in either layout (told from its keys). Raises WeightsError naming the
    file (and the key) for: a pickle (never opened), another kind of file, a truncated or corrupt file, keys
    of neither layout, an unsupported variant (LoHa, LoKr, DoRA, ...), a module missing its down or up
    weight, ranks that disagree, an alpha that is not a finite number > 0, non-finite values."""
    path = require_file(path, "LoRA file")
    kind = sniff_format(path)
    if kind == "pickle":
        raise pickle_refused(path, offered=False)
    if kind is None:
        raise not_a_weights_file(path, pickles=False)
    with SafetensorsFile(path) as f:
        keys = f.keys()
        if not keys:
            raise WeightsError(f"{path}: holds no tensors (an empty LoRA file)")
        fmt, groups = _group_keys(path, keys)
        metadata = _peft_metadata(path, f.metadata) if fmt == "peft" else {}
        for module, parts in groups.items():  # shapes and ranks from the header, before any data is read
            _check_shapes(path, module, {role: f.meta(key) for role, key in parts.items()})
        modules = {}
        for module, parts in groups.items():
            down, up = f.read(parts["down"]), f.read(parts["up"])
            if "alpha" in parts:
                alpha = _alpha_value(path, parts["alpha"], f.read(parts["alpha"]))
            elif fmt == "peft":
                alpha = _peft_alpha(path, metadata, module, down.shape[0])
            else:
                alpha = float(down.shape[0])  # no alpha: alpha = r, scale 1
            if alpha / down.shape[0] > MAX_SCALE:  # finite but absurd: the update would overflow float32
                raise WeightsError(f"{path}: {parts['down']}: alpha {alpha:.6g} over rank {down.shape[0]} scales "
                                   f"the update by {alpha / down.shape[0]:.3g}; at most {MAX_SCALE:g} is accepted")
            modules[module] = LowRank(down, up, alpha)
    return LoraFile(path, fmt, modules)


def _group_keys(path: Path, keys: list[str]) -> tuple[str, dict[FileModule, dict[str, str]]]:
    for key in keys:
        for pattern, name in _UNSUPPORTED:
            if pattern.search(key):
                raise WeightsError(f"{path}: key {key!r} belongs to a {name} adapter, which diffusekit does not "
                                   "load (supported: LoRA and LoCon in the kohya and PEFT layouts)")  # fmt: skip
    groups: dict[FileModule, dict[str, str]] = {}
    formats: set[str] = set()
    unknown = []
    for key in keys:
        if m := _KOHYA_KEY.match(key):
            module = FileModule(_KOHYA_PREFIXES[m.group(1)], m.group(2), m.group(1) + m.group(2))
            formats.add("kohya")
        elif m := _PEFT_KEY.match(key):
            module = FileModule(m.group(1), m.group(2).removeprefix(REFERENCE_PREFIX), f"{m.group(1)}.{m.group(2)}")
            formats.add("peft")
        else:
            unknown.append(key)
            continue
        groups.setdefault(module, {})[_ROLE[m.group(3)]] = key
    if unknown:
        raise WeightsError(
            f"{path}: {len(unknown)} keys are not LoRA keys of the kohya layout (lora_unet_*/lora_te*_* with "
            f".lora_down.weight, .lora_up.weight, .alpha) or the PEFT layout (unet.*/text_encoder*.* with "
            f".lora_A.weight, .lora_B.weight): {_few(unknown)}"
        )
    if len(formats) > 1:
        raise WeightsError(f"{path}: mixes kohya keys (lora_unet_*, lora_te_*) and PEFT keys (unet.*, text_encoder.*)")
    incomplete = [f"{m.stem} (no {'up' if 'down' in p else 'down'} weight)" for m, p in groups.items()
                  if not {"down", "up"} <= set(p)]  # fmt: skip
    if incomplete:
        raise WeightsError(f"{path}: modules without both a down (A) and an up (B) weight: {_few(incomplete)}")
    return formats.pop(), groups


def _check_shapes(path: Path, module: FileModule, meta: dict[str, Tensor]) -> None:
    down, up = meta["down"], meta["up"]
    where = f"{path}: {module.stem}"
    if not (down.dtype.is_floating_point and up.dtype.is_floating_point):
        raise WeightsError(f"{where}: down/up weights must be floating point, got {down.dtype}, {up.dtype}")
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise WeightsError(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} must be 2-D (linear) or "
                           "4-D (convolution)")  # fmt: skip
    rank = down.shape[0]
    if not 1 <= rank <= MAX_WIDTH or up.shape[1] != rank:
        raise WeightsError(f"{where}: rank mismatch: down {tuple(down.shape)} has rank {rank}, up "
                           f"{tuple(up.shape)} has {up.shape[1]} (each must be the same, 1..{MAX_WIDTH})")  # fmt: skip
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise WeightsError(f"{where}: up weight {tuple(up.shape)} must be a 1x1 convolution")
    if "alpha" in meta and meta["alpha"].numel() != 1:
        raise WeightsError(f"{where}.alpha: must hold one number, has shape {tuple(meta['alpha'].shape)}")


def _alpha_value(path: Path, key: str, tensor: Tensor) -> float:
    if tensor.dtype == torch.bool:
        raise WeightsError(f"{path}: {key}: alpha must be a number, got a bool tensor")
    return _check_alpha(path, key, float(tensor.reshape(-1)[0]))


def _check_alpha(path: Path, key: str, alpha: object) -> float:
    ok = isinstance(alpha, int | float) and not isinstance(alpha, bool)
    if ok:
        try:
            ok = math.isfinite(float(alpha)) and alpha > 0
        except OverflowError:  # an integer beyond any float
            ok = False
    if not ok:
        raise WeightsError(f"{path}: {key}: alpha must be a finite number > 0 (the update is scaled by alpha / "
                           f"rank), got {alpha!r}")  # fmt: skip
    return float(alpha)


def _peft_metadata(path: Path, metadata: dict[str, str]) -> dict:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: __metadata__[{METADATA_KEY!r}] is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: __metadata__[{METADATA_KEY!r}] must be a JSON object")
    for component in COMPONENTS:
        if data.get(f"{component}.use_dora") is True:
            raise WeightsError(f"{path}: {component}.use_dora is set: a DoRA adapter, which diffusekit does not load")
    return data


def _peft_alpha(path: Path, metadata: dict, module: FileModule, rank: int) -> float:
    """alpha for one module from the peft config: ``alpha_pattern`` (module-name suffixes, taken literally),
    else ``lora_alpha``; with ``use_rslora`` the scale is alpha / sqrt(r), returned here as the alpha that
    gives it over r. No config for the component: alpha = r."""
    c = module.component
    if f"{c}.lora_alpha" not in metadata and f"{c}.alpha_pattern" not in metadata:
        return float(rank)
    alpha = metadata.get(f"{c}.lora_alpha", metadata.get(f"{c}.r", rank))
    key = f"{c}.lora_alpha"
    pattern = metadata.get(f"{c}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise WeightsError(f"{path}: metadata {c}.alpha_pattern must be an object, got {type(pattern).__name__}")
    for suffix, value in pattern.items():
        if module.target == suffix or module.target.endswith("." + suffix):
            alpha, key = value, f"{c}.alpha_pattern[{suffix!r}]"
            break
    alpha = _check_alpha(path, f"metadata {key}", alpha)
    if metadata.get(f"{c}.use_rslora") is True:
        alpha = alpha * math.sqrt(rank)  # rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(r) = (alpha sqrt(r)) / r
    return alpha


# ---------------------------------------------------------------------------------------------------------
# Module names: the file's spellings of our modules


def reference_module_name(component: str, module: str) -> str:
    """The reference's dotted name of our module ``module`` of ``component`` (the text encoder's with
    ``text_model.``), from the state-dict key maps."""
    key = f"{module}.weight"
    if component == "unet":
        (ref,) = to_diffusers_state_dict({key: torch.empty(0)})
    else:
        (ref,) = text_encoder_to_diffusers_state_dict({key: torch.empty(0)}, prefix=REFERENCE_PREFIX)
    return ref.removesuffix(".weight")


def _spellings(component: str, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """({kohya spelling: our module}, {PEFT dotted spelling: our module}) for every adaptable layer."""
    kohya: dict[str, str] = {}
    dotted: dict[str, str] = {}
    compvis = {}
    if isinstance(model, UNet):
        try:
            compvis = unet_key_map(model.config).names
        except (WeightsError, ConfigError):  # a tree the single-file layout does not describe
            compvis = {}
    for name, module in model.named_modules():
        if not isinstance(module, ADAPTED_LAYERS):
            continue
        ref = reference_module_name(component, name)
        for spelling in (ref, ref.removeprefix(REFERENCE_PREFIX)):
            dotted.setdefault(spelling, name)
            kohya.setdefault(spelling.replace(".", "_"), name)
        if f"{name}.weight" in compvis:
            old = compvis[f"{name}.weight"].removeprefix(UNET_PREFIX).removesuffix(".weight")
            kohya.setdefault(old.replace(".", "_"), name)
    if component == "unet":  # older reference names (query/key/value/proj_attn) of spatial attention
        for ref in list(dotted):
            for old in from_diffusers_state_dict({f"{ref}.weight": torch.empty(0)}):
                dotted.setdefault(old.removesuffix(".weight"), dotted[ref])
    elif isinstance(model, ClipTextEncoder):
        for ref in list(dotted):
            (ours,) = text_encoder_from_diffusers_state_dict({f"{ref}.weight": torch.empty(0)})
            dotted.setdefault(ours.removesuffix(".weight"), dotted[ref])
    return kohya, dotted


def resolve(lora: LoraFile, components: Mapping[str, nn.Module]) -> dict[str, dict[str, LowRank]]:
    """The file's updates as {component: {our module name: update}}, each fitted to its layer. Changes nothing.
    Raises WeightsError naming the file:

    * a LoRA of another model family (an SDXL LoRA on SD-1 and the reverse), told before any shape is
      blamed: adapters for a component the model lacks (``text_encoder_2`` on SD-1), or more than half of
      the adapted modules (at least two) matching no layer or fitting none of its shapes; a few keys named;
    * otherwise the first module whose shapes do not fit (naming the key), or the modules that match no
      layer (a few listed, with their count)."""
    out: dict[str, dict[str, LowRank]] = {}
    model_has = ", ".join(components) + (": SDXL" if "text_encoder_2" in components else "")
    missing = [c for c in lora.components if c not in components]
    if missing:
        stems = sorted(m.stem for m in lora.modules if m.component in missing)
        raise WeightsError(
            f"{lora.path}: has adapters for {', '.join(missing)} ({_few(stems, 3)}), which this model does not "
            f"have (it has {model_has}); the LoRA was made for another model family"
        )
    unmatched: list[str] = []
    misfits: list[tuple[str, str]] = []  # (stem, why its shapes do not fit)
    for component in lora.components:
        model = components[component]
        kohya, dotted = _spellings(component, model)
        table = kohya if lora.format == "kohya" else dotted
        layers = dict(model.named_modules())
        mapped: dict[str, LowRank] = {}
        for module, update in lora.modules.items():
            if module.component != component:
                continue
            ours = table.get(module.target)
            if ours is None:
                unmatched.append(module.stem)
                continue
            if ours in mapped:
                raise WeightsError(f"{lora.path}: {module.stem}: a second adapter for module {ours!r}")
            try:
                mapped[ours] = fitted(layers[ours], update)
            except WeightsError as e:
                misfits.append((module.stem, str(e)))
        out[component] = mapped
    foreign = sorted(unmatched + [stem for stem, _ in misfits])
    if len(foreign) >= 2 and len(foreign) > len(lora.modules) / 2:
        raise WeightsError(
            f"{lora.path}: made for another model family: {len(foreign)} of {len(lora.modules)} adapted modules "
            f"match no layer of this model ({model_has}) or fit none of its shapes: {_few(foreign, 3)}"
        )
    if misfits:
        stem, why = misfits[0]
        raise WeightsError(f"{lora.path}: {stem}: {why}")
    if unmatched:
        raise WeightsError(f"{lora.path}: {len(unmatched)} of {len(lora.modules)} adapted modules match no layer "
                           f"of the model: {_few(sorted(unmatched))}")  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_lora(
    updates: Mapping[str, Mapping[str, LowRank]],
    path: str | os.PathLike,
    *,
    format: str = "kohya",
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> None:
    """Write {component: {our module name: update}} as a ``.safetensors`` LoRA file in the ``format`` layout
    (``"kohya"`` or ``"peft"``), atomically. kohya: the text encoder is ``lora_te_`` (``lora_te1_`` when a
    ``text_encoder_2`` is present), alpha as a 0-d float32 tensor per module. PEFT: per component ``r`` and
    ``lora_alpha`` (the most common values) with ``rank_pattern`` / ``alpha_pattern`` for the other modules
    in ``__metadata__["lora_adapter_metadata"]``, as the reference's loader reads them. ``metadata``: more
    header entries (strings; kohya's trainers record theirs as ``ss_*``). ``overwrite=False``: an existing
    file of that name is kept and WeightsError raised."""
    check_choice("format", format, FORMATS)
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ConfigError("LoRA file metadata must map strings to strings")
    unknown = [c for c in updates if c not in COMPONENTS]
    if unknown:
        raise ConfigError(f"component {unknown[0]!r} is not supported; allowed values: {', '.join(COMPONENTS)}")
    tensors: dict[str, Tensor] = {}
    config: dict[str, object] = {}
    two_encoders = "text_encoder_2" in updates
    for component, modules in updates.items():
        for module, u in modules.items():
            ref = reference_module_name(component, module)
            if format == "kohya":
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_",
                          "text_encoder_2": "lora_te2_"}[component]  # fmt: skip
                stem = prefix + ref.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = u.down
                tensors[f"{stem}.lora_up.weight"] = u.up
                tensors[f"{stem}.alpha"] = torch.tensor(float(u.alpha), dtype=torch.float32)
            else:
                stem = f"{component}.{ref.removeprefix(REFERENCE_PREFIX)}"
                tensors[f"{stem}.lora_A.weight"] = u.down
                tensors[f"{stem}.lora_B.weight"] = u.up
        if format == "peft" and modules:
            config.update(_peft_config(component, modules))
    header = {**extra, "format": "pt"}
    if format == "peft":
        header[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    save_weights(tensors, path, metadata=header, overwrite=overwrite)


def _peft_config(component: str, modules: Mapping[str, LowRank]) -> dict[str, object]:
    names = {m: reference_module_name(component, m).removeprefix(REFERENCE_PREFIX) for m in modules}
    r = Counter(u.rank for u in modules.values()).most_common(1)[0][0]
    alpha = Counter(u.alpha for u in modules.values()).most_common(1)[0][0]
    targets = sorted(names.values())  # full module paths: peft matches a target as a name or a dotted suffix
    fields = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {names[m]: u.rank for m, u in modules.items() if u.rank != r},
        "alpha_pattern": {names[m]: u.alpha for m, u in modules.items() if u.alpha != alpha},
        "target_modules": targets,
        "peft_type": "LORA",
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
    }
    return {f"{component}.{k}": v for k, v in fields.items()}


__all__ = [
    "COMPONENTS",
    "FORMATS",
    "FileModule",
    "LoraFile",
    "read_lora",
    "reference_module_name",
    "resolve",
    "save_lora",
]
