"""The settings a generated PNG carries: diffusekit's ``diffusekit`` JSON chunk, and the human-readable
``parameters`` text the popular SD tools write (and read), which diffusekit writes beside it and reads back
from other tools' PNGs (:func:`recipe_from_parameters`). Reading never crashes on a hostile file: anything
malformed is a ConfigError naming the PNG.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.pipelines.fields import short as _short
from diffusekit.samplers.names import KARRAS, check_karras, lookup, web_ui_name

METADATA_KEY = "diffusekit"  # PNG text chunk holding the JSON metadata
PARAMETERS_KEY = "parameters"  # PNG text chunk in the human-readable form other SD tools use
METADATA_FORMAT = "diffusekit-generation"
METADATA_VERSION = 2  # 2 added karras and loras; a version-1 PNG used neither (the model's own sigma grid)
READ_VERSIONS = (1, 2)
MAX_METADATA_CHARS = 1_000_000


def parameters_text(meta: Mapping[str, Any]) -> str:
    """The human-readable ``parameters`` chunk: prompt, negative prompt, then ``Key: value`` pairs."""
    karras = bool(meta.get("karras"))
    combined = web_ui_name(meta["sampler"], karras)  # "DPM++ 2M Karras"; else the plain name + Schedule type
    shown = combined or web_ui_name(meta["sampler"], False)
    loras = ", ".join(f"{Path(x['path']).name}: {x['weight']}" for x in meta.get("loras") or ())
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", shown or meta["sampler"]),
        ("Schedule type", KARRAS if karras and combined is None else None),
        ("CFG scale", meta["guidance"]),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model", Path(meta["model"]).name),
        ("Denoising strength", meta["strength"]),
        ("Eta", meta["eta"]),
        ("LoRA", json.dumps(loras) if loras else None),  # quoted as the web UI quotes values with commas
        ("Mode", meta["mode"]),
        ("Version", f"diffusekit {meta['diffusekit_version']}"),
    ]
    pairs = ", ".join(f"{k}: {v}" for k, v in fields if v is not None)
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    return "\n".join([*lines, pairs])


def _png_texts(path: str | os.PathLike, where: str) -> tuple[Any, Any]:
    """The ``diffusekit`` and ``parameters`` text chunks of a PNG (None where absent); a ConfigError starting
    with ``where PATH`` for a missing, unreadable or non-PNG file -- never a crash on a hostile file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file not found: {path}")
    where = f"{where} {path}"
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ConfigError(f"{where}: not a PNG image (format {im.format})")
            texts = im.info.get(METADATA_KEY), im.info.get(PARAMETERS_KEY)
    except DiffusekitError:
        raise
    except Exception as e:  # Pillow raises many types for malformed files; all mean "unreadable"
        raise ConfigError(f"{where}: not a readable PNG ({type(e).__name__}: {_short(str(e))})") from None
    return tuple(t.decode("latin-1") if isinstance(t, bytes) else t for t in texts)  # type: ignore[return-value]


def read_png_settings(path: str | os.PathLike, where: str = "--replay") -> dict[str, Any] | Parameters:
    """What a PNG records of how it was made: the ``diffusekit`` JSON object (:func:`read_png_metadata`), or,
    in a PNG of another SD tool, its ``parameters`` text read by :func:`recipe_from_parameters`."""
    ours, theirs = _png_texts(path, where)
    if ours is None and theirs is not None:
        return recipe_from_parameters(theirs, f"{where} {Path(path)}")
    return read_png_metadata(path, where)


def read_png_metadata(path: str | os.PathLike, where: str = "--replay") -> dict[str, Any]:
    """The ``diffusekit`` JSON object of a PNG this library wrote; a ConfigError starting with ``where`` for
    anything else (missing or unreadable file, not a PNG, no or malformed chunk) -- never a crash on a
    hostile file."""
    text, _ = _png_texts(path, where)
    where = f"{where} {Path(path)}"
    if text is None:
        raise ConfigError(f"{where}: the PNG has no '{METADATA_KEY}' metadata or '{PARAMETERS_KEY}' text; only "
                          "images written by diffusekit or another SD tool can be replayed")  # fmt: skip
    if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
        raise ConfigError(f"{where}: the '{METADATA_KEY}' metadata is not text of a sane length")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: the '{METADATA_KEY}' metadata is not valid JSON ({_short(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the '{METADATA_KEY}' metadata is not a JSON object")
    if data.get("format") != METADATA_FORMAT or data.get("format_version") not in READ_VERSIONS:
        raise ConfigError(
            f"{where}: unknown metadata format {_short(data.get('format'))} version "
            f"{_short(data.get('format_version'))}; this diffusekit reads {METADATA_FORMAT} versions "
            f"{', '.join(map(str, READ_VERSIONS))}"
        )
    return data


# the ``parameters`` text other SD tools write: "Key: value" pairs, a value quoted when it holds a comma
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/().]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
# its keys -> (recipe field, parser); a key not here is listed as unused
_PARAMETER_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
    "Denoising strength": ("strength", float), "Eta": ("eta", float), "Sampler": ("sampler", str),
    "Schedule type": ("karras", str), "Size": ("width", str),
}  # fmt: skip
PARAMETER_KEYS = {field: key for key, (field, _) in _PARAMETER_KEYS.items()} | {"height": "Size"}  # field -> key
_IGNORED_KEYS = ("Model", "Model hash", "Version", "Mode", "LoRA")  # identify the model or tool: nothing to redo
_EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


@dataclass(frozen=True)
class Parameters:
    """What :func:`recipe_from_parameters` read: recipe ``fields``, the LoRAs the prompt names as
    ``<lora:NAME:WEIGHT>`` (taken out of the prompt), and the settings it cannot redo (``unused``)."""

    fields: dict[str, Any]
    loras: dict[str, float]
    unused: list[str]


def recipe_from_parameters(text: str, where: str) -> Parameters:
    """The settings of another SD tool's ``parameters`` PNG text (prompt lines, ``Negative prompt: ...``,
    then ``Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...``)
    as recipe fields: prompt, negative_prompt, steps, guidance, seed, sampler and karras (web-UI names),
    width and height, strength, eta (DDIM only). Values are checked by :meth:`Recipe.validated` later;
    a value that does not parse, an unknown sampler or schedule type is a ConfigError naming
    ``{where}: 'Key'``. The model and input images are not in the text: the caller names them."""
    if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
        raise ConfigError(f"{where}: the '{PARAMETERS_KEY}' text is not text of a sane length")
    lines = text.replace("\r\n", "\n").split("\n")
    settings = lines.pop() if lines and re.search(r"(^|, )Steps: ", lines[-1]) else ""
    if not settings:
        raise ConfigError(f"{where}: the '{PARAMETERS_KEY}' text has no 'Steps: N, Sampler: ...' line")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].lstrip()
        (negative if in_negative else prompt).append(line)
    fields: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    loras: dict[str, float] = {}
    unused: list[str] = []
    for match in _EXTRA_NETWORK.finditer(fields["prompt"]):
        kind, lora_name, weight = match.group(1), match.group(2).strip(), match.group(3)
        if kind == "hypernet":
            unused.append(match.group(0))
            continue
        try:
            loras[lora_name] = float(weight) if weight not in (None, "") else 1.0
        except ValueError:
            raise ConfigError(f"{where}: the prompt's {match.group(0)} has no numeric weight") from None
    fields["prompt"] = _EXTRA_NETWORK.sub("", fields["prompt"]).strip()
    schedule = None
    for key, value in _PAIR.findall(settings):
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        if key not in _PARAMETER_KEYS:
            if key not in _IGNORED_KEYS:
                unused.append(key)
            continue
        field, parse = _PARAMETER_KEYS[key]
        if key == "Size":
            m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value)
            if not m:
                raise ConfigError(f"{where}: 'Size' must be WIDTHxHEIGHT, got {_short(value)}")
            fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
        elif key == "Schedule type":
            schedule = value
        else:
            try:
                fields[field] = parse(value)
            except (ValueError, OverflowError):
                raise ConfigError(f"{where}: '{key}' {_short(value)} is not a number") from None
    if "sampler" in fields:
        fields["sampler"], fields["karras"] = lookup(fields["sampler"], f"{where}: 'Sampler'")
    if schedule not in (None, "Automatic", KARRAS):
        raise ConfigError(f"{where}: 'Schedule type' {_short(schedule)} is not supported; allowed: Automatic "
                          f"(the sampler's own), {KARRAS}")  # fmt: skip
    if schedule == KARRAS:
        check_karras(f"{where}: 'Schedule type' {KARRAS}", fields.get("sampler") or "", True)
        fields["karras"] = True
    if fields.get("sampler") != "ddim" and fields.pop("eta", None) is not None:
        unused.append("Eta")  # the web UI records eta for its ancestral samplers too; ours applies to DDIM only
    return Parameters(fields, loras, unused)


__all__ = ["MAX_METADATA_CHARS", "METADATA_FORMAT", "METADATA_KEY", "METADATA_VERSION", "PARAMETERS_KEY",
           "PARAMETER_KEYS", "READ_VERSIONS", "Parameters", "parameters_text", "read_png_metadata",
           "read_png_settings", "recipe_from_parameters"]  # fmt: skip
