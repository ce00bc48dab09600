"""The community API's vocabulary (the ``/sdapi/v1`` routes of the most used SD web UI) mapped onto recipes.

A request body is a JSON object with the web UI's field names (``prompt``, ``cfg_scale``, ``sampler_name``,
``denoising_strength``, ``init_images`` ...). :func:`parse_request` maps them onto
:class:`~diffusekit.pipelines.recipe.Recipe` fields and lets the recipe validate them, so the settings, their
defaults and their bounds live in the recipe alone; messages name the API's field (``field 'cfg_scale'``).
Fields this server does not use are listed, never an error (a script written for the web UI sends many).
:func:`parse_infotext` reads the web UI's human-readable ``parameters`` PNG chunk back into API fields.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.limits import check_flag, check_int
from diffusekit.pipelines.recipe import DEFAULTS, MAX_SEED, SAMPLER_NAMES, Recipe

# the web UI's sampler names -> ours, with the other spellings its clients send (old k-diffusion names, ours)
SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m", "dpm++2m", "dpmpp_2m")),
    "Euler a": ("euler_ancestral", ("k_euler_a", "k_euler_ancestral", "euler-a", "euler_a", "euler_ancestral")),
    "Euler": ("euler", ("k_euler", "euler")),
    "Heun": ("heun", ("k_heun", "heun")),
    "DPM2": ("kdpm2", ("k_dpm_2", "kdpm2")),
    "DDIM": ("ddim", ("ddim",)),
    "PLMS": ("pndm", ("plms", "pndm")),
    "UniPC": ("unipc", ("unipc",)),
    "LCM": ("lcm", ("lcm",)),
    "DDPM": ("ddpm", ("ddpm",)),
}
_SPELLINGS = {s.lower(): ours for name, (ours, aliases) in SAMPLERS.items() for s in (name, *aliases)}
UI_NAME = {ours: name for name, (ours, _) in SAMPLERS.items()}  # our sampler -> the web UI's name

# recipe fields -> the API fields that set them (the vocabulary of this server's messages)
API_FIELDS = {"guidance": "cfg_scale", "sampler": "sampler_name", "strength": "denoising_strength",
              "image": "init_images"}  # fmt: skip
TXT2IMG_FIELDS = ("prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "steps",
                  "cfg_scale", "width", "height", "batch_size", "n_iter", "eta", "send_images",
                  "save_images")  # fmt: skip
IMG2IMG_FIELDS = (*TXT2IMG_FIELDS, "init_images", "mask", "denoising_strength")
RANDOM_SEED = -1


def api_field(field: str) -> str:
    """How messages name a recipe field: by the API field that sets it."""
    return f"field '{API_FIELDS.get(field, field)}'"


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server, beyond the recipe's own bounds."""

    max_side: int = 2048  # pixels, width and height
    max_batch: int = 16  # images per network batch (batch_size)
    max_n_iter: int = 100  # batches per request (n_iter)


@dataclass
class Request:
    """A parsed request: one recipe per image (image i of the run has seed base + i), run in network
    batches of ``batch_size``."""

    mode: str
    recipes: list[Recipe]
    batch_size: int
    send_images: bool
    ignored: list[str]
    parameters: dict[str, Any]  # the request's fields with the values used (the API's ``parameters``)


StoreImage = Callable[[str, Any, str], str]  # (API field, base64 value, "RGB" or "L") -> a server-owned path


def parse_request(
    body: Any, mode: str, *, model: str, tokenizer: str | None, dtype: str, limits: Limits, store_image: StoreImage
) -> Request:
    """Map a ``/sdapi/v1/txt2img`` (``mode`` txt2img) or ``/sdapi/v1/img2img`` (img2img; a ``mask`` makes it
    inpaint) body onto validated recipes; ConfigErrors name the API field. ``store_image`` turns a base64
    image into a file the server owns (never a path the client chooses)."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"the request body must be a JSON object, got {type(body).__name__}")
    known = IMG2IMG_FIELDS if mode == "img2img" else TXT2IMG_FIELDS
    ignored = {str(k) for k in body if k not in known}
    get = body.get
    batch_size = check_int("field 'batch_size'", get("batch_size", 1), 1, limits.max_batch)
    n_iter = check_int("field 'n_iter'", get("n_iter", 1), 1, limits.max_n_iter)
    send_images = check_flag("field 'send_images'", get("send_images", True))
    check_flag("field 'save_images'", get("save_images", True))  # accepted; every image is kept on disk
    sampler_field = "sampler_index" if "sampler_name" not in body and "sampler_index" in body else "sampler_name"
    sampler = sampler_name(get(sampler_field), sampler_field)
    scheduler = get("scheduler")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler.lower() not in ("automatic", "")):
        raise ConfigError(f"field 'scheduler' must be 'Automatic' (the sampler's own noise schedule), got "
                          f"{_short(scheduler)}")  # fmt: skip
    eta = get("eta")
    if eta is not None and sampler != "ddim":
        ignored.add("eta")  # clients send eta with every sampler; it applies to DDIM only
        eta = None
    seed = get("seed", RANDOM_SEED)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed == RANDOM_SEED:
        seed = secrets.randbelow(2**32)
    data: dict[str, Any] = {
        "mode": mode, "prompt": get("prompt", ""), "negative_prompt": get("negative_prompt", ""), "seed": seed,
        "steps": get("steps", DEFAULTS["steps"]), "guidance": get("cfg_scale", DEFAULTS["guidance"]),
        "sampler": sampler, "width": get("width"), "height": get("height"), "eta": eta, "model": model,
        "tokenizer": tokenizer, "dtype": dtype,
    }  # fmt: skip
    images: dict[str, tuple[str, Any, str]] = {}  # recipe field -> (API field, base64 value, image mode)
    if mode == "img2img":
        init = get("init_images")
        if not isinstance(init, list) or len(init) != 1:
            got = f"{len(init)} images" if isinstance(init, list) else _short(init)
            raise ConfigError(f"field 'init_images' must be a list of one base64-encoded image, got {got}")
        images["image"] = ("init_images", init[0], "RGB")
        if get("mask") is not None:
            data["mode"] = "inpaint"
            images["mask"] = ("mask", get("mask"), "L")
        if get("denoising_strength") is not None:
            data["strength"] = get("denoising_strength")
    name = _namer(sampler_field)
    # every setting is checked before any image is decoded (the images' paths are placeholders until then)
    Recipe.from_dict({**data, **{field: f"({api})" for field, (api, _, _) in images.items()}}, name=name)
    for side in ("width", "height"):
        if data[side] is not None and data[side] > limits.max_side:
            raise ConfigError(f"field '{side}' must be at most {limits.max_side} on this server (diffusekit serve "
                              f"--max-side), got {data[side]}")  # fmt: skip
    total = batch_size * n_iter
    if data["seed"] + total - 1 > MAX_SEED:
        raise ConfigError(f"field 'seed' {data['seed']} + {total} images exceeds the largest seed {MAX_SEED}")
    for field, (api, value, image_mode) in images.items():
        data[field] = store_image(api, value, image_mode)
    base = Recipe.from_dict(data, name=name)
    recipes = [base.replace(seed=base.seed + i) for i in range(total)]
    parameters: dict[str, Any] = {"scheduler": scheduler}
    parameters.update(prompt=base.prompt, negative_prompt=base.negative_prompt, seed=base.seed, steps=base.steps,
                      cfg_scale=base.guidance, width=base.width, height=base.height, batch_size=batch_size,
                      n_iter=n_iter, send_images=send_images, eta=base.eta,
                      sampler_name=UI_NAME.get(base.sampler) if base.sampler else None)  # fmt: skip
    if mode == "img2img":
        parameters["denoising_strength"] = base.strength
    return Request(base.mode, recipes, batch_size, send_images, sorted(ignored), parameters)


def _namer(sampler_field: str) -> Callable[[str], str]:
    def name(field: str) -> str:
        return f"field '{sampler_field}'" if field == "sampler" else api_field(field)

    return name


def sampler_name(value: Any, where: str = "sampler_name") -> str | None:
    """The web UI's sampler name (or one of its other spellings, or ours) -> ours; None/"" -> None (the
    model's own sampler). A ConfigError lists the web UI's names."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.lower() in _SPELLINGS:
        return _SPELLINGS[value.lower()]
    if isinstance(value, str) and value in SAMPLER_NAMES:
        return SAMPLER_NAMES[value]
    raise ConfigError(f"field '{where}' must be one of {', '.join(SAMPLERS)}, got {_short(value)}")


def samplers_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: the web UI's names with their aliases."""
    return [{"name": name, "aliases": list(aliases), "options": {}} for name, (_, aliases) in SAMPLERS.items()]


# ---------------------------------------------------------------------------------------------------------
# The web UI's ``parameters`` text, read back

_PAIR = re.compile(r'\s*([A-Za-z][\w \-/().]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NUMBER_KEYS = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
                "Denoising strength": ("denoising_strength", float), "Eta": ("eta", float)}  # fmt: skip
MAX_INFOTEXT_CHARS = 200_000


def parse_infotext(text: str) -> dict[str, Any]:
    """The web UI's ``parameters`` text (prompt lines, ``Negative prompt: ...``, then ``Key: value, ...``)
    -> API fields (prompt, negative_prompt, steps, sampler_name, cfg_scale, seed, width, height,
    denoising_strength, eta); keys it does not know go under ``other``. Malformed values are skipped."""
    text = text[:MAX_INFOTEXT_CHARS].replace("\r\n", "\n")
    lines = text.split("\n")
    settings_line = ""
    if lines and _looks_like_settings(lines[-1]):
        settings_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    other: dict[str, str] = {}
    for key, value in _PAIR.findall(settings_line):
        key, value = key.strip(), value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1].replace('\\"', '"')
        if key in _NUMBER_KEYS:
            field, kind = _NUMBER_KEYS[key]
            try:
                out[field] = kind(value)
            except ValueError:
                continue
        elif key == "Sampler":
            spelled = _SPELLINGS.get(value.lower()) or SAMPLER_NAMES.get(value)
            out["sampler_name"] = UI_NAME.get(spelled, value) if spelled else value
        elif key == "Size":
            m = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value)
            if m:
                out["width"], out["height"] = int(m.group(1)), int(m.group(2))
        else:
            other[key] = value
    if other:
        out["other"] = other
    return out


def _looks_like_settings(line: str) -> bool:
    return bool(re.search(r"(^|, )Steps: \d", line))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["API_FIELDS", "SAMPLERS", "UI_NAME", "Limits", "Request", "api_field", "parse_infotext", "parse_request",
           "sampler_name", "samplers_list"]  # fmt: skip
