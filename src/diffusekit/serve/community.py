"""The community API's vocabulary (the ``/sdapi/v1`` routes of the most used SD web UI) mapped onto recipes.

A request body is a JSON object with the web UI's field names (``prompt``, ``cfg_scale``, ``sampler_name``,
``denoising_strength``, ``init_images`` ...). :func:`parse_request` maps them onto
:class:`~diffusekit.pipelines.recipe.Recipe` fields and lets the recipe validate them, so the settings, their
defaults and their bounds live in the recipe alone; messages name the API's field (``field 'cfg_scale'``).
Fields this server does not use are listed, never an error (a script written for the web UI sends many).
Sampler names are the one table of :mod:`diffusekit.samplers.names`; :func:`api_settings` turns recipe
fields (a PNG's metadata, or the ``parameters`` text read by the recipe's reader) back into API fields.
Beyond the web UI's fields, ``guidance_interval`` [lo, hi] (hi null: no upper end) limits the guidance to noise
levels lo < sigma <= hi (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models"), as the recipe field of that name.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.limits import check_flag, check_int, short_repr
from diffusekit.pipelines.recipe import DEFAULTS, MAX_SEED, Recipe
from diffusekit.samplers.names import KARRAS, WEB_UI, lookup, web_ui_name

# recipe fields -> the API fields that set them (the vocabulary of this server's messages)
API_FIELDS = {"guidance": "cfg_scale", "sampler": "sampler_name", "strength": "denoising_strength",
              "image": "init_images", "karras": "scheduler"}  # fmt: skip
TXT2IMG_FIELDS = ("prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "steps",
                  "cfg_scale", "width", "height", "batch_size", "n_iter", "eta", "send_images",
                  "save_images", "guidance_interval")  # fmt: skip
IMG2IMG_FIELDS = (*TXT2IMG_FIELDS, "init_images", "mask", "denoising_strength")
RANDOM_SEED = -1
SCHEDULERS = {"automatic": None, "": None, KARRAS.lower(): True}  # the web UI's schedule types we run


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
    sampler = get(sampler_field)  # any accepted spelling; the recipe reads it ("Euler a", "DPM++ 2M Karras")
    sampler = None if sampler == "" else sampler
    ours = lookup(sampler, f"field '{sampler_field}'")[0] if sampler is not None else None
    scheduler = get("scheduler")
    if scheduler is not None and (not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS):
        raise ConfigError(f"field 'scheduler' must be Automatic (the sampler's own noise levels) or {KARRAS}, got "
                          f"{short_repr(scheduler, 60)}")  # fmt: skip
    karras = SCHEDULERS[scheduler.lower()] if scheduler is not None else None
    if karras is not None and sampler is not None:
        sampler = ours  # the web UI's newer clients name the grid apart: "DPM++ 2M" with scheduler "Karras"
    eta = get("eta")
    if eta is not None and ours != "ddim":
        ignored.add("eta")  # clients send eta with every sampler; it applies to DDIM only
        eta = None
    seed = get("seed", RANDOM_SEED)
    if isinstance(seed, int) and not isinstance(seed, bool) and seed == RANDOM_SEED:
        seed = secrets.randbelow(2**32)
    data: dict[str, Any] = {
        "mode": mode, "prompt": get("prompt", ""), "negative_prompt": get("negative_prompt", ""), "seed": seed,
        "steps": get("steps", DEFAULTS["steps"]), "sampler": sampler, "width": get("width"),
        "height": get("height"), "eta": eta, "model": model, "tokenizer": tokenizer, "dtype": dtype,
        "karras": karras, "guidance_interval": get("guidance_interval"),
    }  # fmt: skip
    if get("cfg_scale") is not None:  # else the recipe's default (the sampler's: LCM runs at guidance 1)
        data["guidance"] = get("cfg_scale")
    images: dict[str, tuple[str, Any, str]] = {}  # recipe field -> (API field, base64 value, image mode)
    if mode == "img2img":
        init = get("init_images")
        if not isinstance(init, list) or len(init) != 1:
            got = f"{len(init)} images" if isinstance(init, list) else short_repr(init, 60)
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
    parameters = {**api_settings(base.to_dict()), "batch_size": batch_size, "n_iter": n_iter,
                  "send_images": send_images}  # fmt: skip
    return Request(base.mode, recipes, batch_size, send_images, sorted(ignored), parameters)


def _namer(sampler_field: str) -> Callable[[str], str]:
    def name(field: str) -> str:
        return f"field '{sampler_field}'" if field == "sampler" else api_field(field)

    return name


def sampler_label(sampler: str | None, karras: bool | None) -> str | None:
    """The name the web UI gives ``sampler`` on its grid (``"DPM++ 2M Karras"``), else ours; None stays None."""
    if sampler is None:
        return None
    return web_ui_name(sampler, bool(karras)) or web_ui_name(sampler, False) or sampler


def api_settings(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Recipe fields (a recipe's dict, a PNG's metadata, the ``parameters`` text as the recipe reads it) ->
    the API fields that make the image again; fields absent from ``fields`` are left out."""
    out: dict[str, Any] = {}
    for field in ("prompt", "negative_prompt", "seed", "steps", "width", "height", "eta"):
        if fields.get(field) is not None:
            out[field] = fields[field]
    if fields.get("guidance") is not None:
        out["cfg_scale"] = fields["guidance"]
    if fields.get("guidance_interval") is not None:  # [lo, hi] as JSON writes it (hi null: no upper end)
        out["guidance_interval"] = fields["guidance_interval"]
    if fields.get("strength") is not None:
        out["denoising_strength"] = fields["strength"]
    if "sampler" in fields:
        out["sampler_name"] = sampler_label(fields["sampler"], fields.get("karras"))
    if fields.get("mode") is not None:
        out["mode"] = fields["mode"]
    return out


def samplers_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: the web UI's names this server runs, with their aliases."""
    return [{"name": n.name, "aliases": [*n.aliases, n.sampler], "options": {"scheduler": KARRAS} if n.karras else {}}
            for n in WEB_UI]  # fmt: skip


__all__ = ["API_FIELDS", "Limits", "Request", "api_field", "api_settings", "parse_request", "sampler_label",
           "samplers_list"]  # fmt: skip
