"""The settings a generated PNG carries: diffusekit's ``diffusekit`` JSON chunk, and the human-readable
``parameters`` text the popular SD tools write (and read), which diffusekit writes beside it and reads back
from other tools' PNGs (:func:`recipe_from_parameters`). Reading never crashes on a hostile file: anything
malformed is a ConfigError naming the PNG.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.pipelines.fields import short as _short
from diffusekit.samplers.guidance import check_guidance_interval
from diffusekit.samplers.names import KARRAS, check_karras, lookup, web_ui_name

METADATA_KEY = "diffusekit"  # PNG text chunk holding the JSON metadata
PARAMETERS_KEY = "parameters"  # PNG text chunk in the human-readable form other SD tools use
METADATA_FORMAT = "diffusekit-generation"
# a reader refuses versions it does not know rather than ignore a setting added since
METADATA_VERSION = 3
READ_VERSIONS = (1, 2, 3)
# the version that added each recipe field; older metadata lacks it and ran with its default: on the model's own
# sigma grid (karras), without LoRAs, with guidance at every step (guidance_interval)
FIELD_VERSIONS = {"karras": 2, "loras": 2, "guidance_interval": 3}
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
        ("Guidance interval", _interval_text(meta.get("guidance_interval"))),
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


# ---------------------------------------------------------------------------------------------------------
# The guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
# Distribution Quality in Diffusion Models"): noise levels lo < sigma <= hi, hi possibly infinite

INTERVAL_FORM = "[LO, HI], two noise levels sigma with 0 <= LO < HI (HI null: no upper end), e.g. [0.28, 5.42]"


def interval_to_json(interval: Sequence[float] | None) -> list[float | None] | None:
    """A guidance interval (lo, hi) as standard JSON, which has no infinity: [lo, hi], an open upper end as null."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    return [lo, None if hi == math.inf else hi]


def interval_from_json(where: str, value: Any) -> tuple[float, float] | None:
    """[lo, hi] as :func:`interval_to_json` writes it (hi null or inf: no upper end) -> the validated (lo, hi)
    with hi = inf for an open end; None stays None. Anything else (a string, a bool, three numbers, lo >= hi) is
    a ConfigError naming ``where`` (:func:`~diffusekit.samplers.guidance.check_guidance_interval`)."""
    if value is None:
        return None
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is not None
    if not numbers or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value):
        raise ConfigError(f"{where} must be {INTERVAL_FORM}; got {_short(value)}")
    try:
        lo, hi = float(value[0]), math.inf if value[1] is None else float(value[1])
    except OverflowError:  # an integer beyond floats
        raise ConfigError(f"{where} must be {INTERVAL_FORM}; got {_short(value)}") from None
    return check_guidance_interval((lo, hi), where)


def _interval_text(interval: Sequence[float | None] | None) -> str | None:
    """The interval as the ``parameters`` text shows it: ``"(0.28, 5.42]"`` (quoted: it holds a comma)."""
    if interval is None:
        return None
    lo, hi = interval
    return json.dumps(f"({float(lo)!r}, {'inf' if hi is None else repr(float(hi))}]")


def _interval_of_text(text: str, where: str) -> list[float | None]:
    """``(LO, HI]`` (HI may be inf) -> [lo, hi] as JSON writes it (the recipe validates it)."""
    m = re.fullmatch(r"\(\s*([^,\s]+)\s*,\s*([^\]\s]+)\s*\]", text)
    try:
        lo, hi = (float(v) for v in (m.groups() if m else ()))
    except ValueError:  # not the form (nothing to unpack), or not numbers
        raise ConfigError(f"{where} must be (LO, HI], two noise levels sigma, e.g. (0.28, 5.42]; got "
                          f"{_short(text)}") from None  # fmt: skip
    return [lo, None if hi == math.inf else hi]


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
    "Schedule type": ("karras", str), "Size": ("width", str), "Guidance interval": ("guidance_interval", str),
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
    width and height, strength, eta (DDIM only), and diffusekit's own ``Guidance interval: "(LO, HI]"``.
    Values are checked by :meth:`Recipe.validated` later; a value that does not parse, an unknown sampler or
    schedule type is a ConfigError naming ``{where}: 'Key'``. The model and input images are not in the text:
    the caller names them."""
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
        elif key == "Guidance interval":
            fields[field] = _interval_of_text(value, f"{where}: '{key}'")
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


__all__ = ["FIELD_VERSIONS", "INTERVAL_FORM", "MAX_METADATA_CHARS", "METADATA_FORMAT", "METADATA_KEY",
           "METADATA_VERSION", "PARAMETERS_KEY", "PARAMETER_KEYS", "READ_VERSIONS", "Parameters", "interval_from_json",
           "interval_to_json", "parameters_text", "read_png_metadata", "read_png_settings",
           "recipe_from_parameters"]  # fmt: skip
