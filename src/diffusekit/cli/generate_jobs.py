"""How a ``txt2img | img2img | inpaint`` run's images come to be: recipes from the options, or from a PNG given to
``--replay`` (its diffusekit recipe, or another SD tool's ``parameters`` text) with the options given beside it,
and the names messages use for recipe fields. The running itself is :mod:`diffusekit.cli.generate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from diffusekit.cli.common import lora_options, parse_guidance_interval, parse_seed, replay_loras
from diffusekit.errors import ConfigError
from diffusekit.limits import check_int
from diffusekit.pipelines.recipe import (
    DEFAULT_STRENGTH,
    DEFAULTS,
    MAX_SEED,
    PARAMETER_KEYS,
    Lora,
    Parameters,
    Recipe,
    chosen_dtype,
    parse_size,
    read_png_settings,
    recipe_from_metadata,
    sampler_and_grid,
)
from diffusekit.runtime.policy import pick_device

RUN_DEFAULTS = {"n": 1, "batch_size": 1}
# recipe fields whose option is not --FIELD
_OPTIONS = {"prompt": "PROMPT", "negative_prompt": "--negative", "width": "--size", "height": "--size",
            "karras": "--sampler", "loras": "--lora"}  # fmt: skip


def option_name(field: str) -> str:
    """The command-line option that sets a recipe field (the vocabulary of this command's messages)."""
    return _OPTIONS.get(field, f"--{field.replace('_', '-')}")


@dataclass
class Job:
    """What a run makes: the recipe of every image (each with its own prompt and seed)."""

    images: list[Recipe]
    batch_size: int
    compare_with: Path | None = None  # a replayed PNG to compare the result with
    name: Callable[[str], str] = option_name  # how messages name a recipe field
    guidance_given: bool = True  # False: the default guidance, which an LCM run replaces with LCM_GUIDANCE
    notes: list[str] = dataclass_field(default_factory=list)  # printed to stderr before the run (unless --quiet)


def job_from_args(args: argparse.Namespace, mode: str) -> Job:
    """The images a run's options ask for: every PROMPT, ``--n`` seeds each from ``--seed``."""
    prompts = list(args.prompt or [])
    if not prompts:
        raise ConfigError("no prompt given: pass one or more PROMPT arguments (or --replay PNG)")
    if args.model is None:
        raise ConfigError("--model PATH is required (a diffusers model folder or a .safetensors file)")
    if args.out is None:
        raise ConfigError("--out DIR is required (the folder the PNGs are written to)")
    n = check_int("--n", RUN_DEFAULTS["n"] if args.n is None else args.n, 1, 10_000)
    batch_size = check_int("--batch-size", RUN_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size,
                           1, 1024)  # fmt: skip
    seed = parse_seed(args.seed)
    if seed + len(prompts) * n - 1 > MAX_SEED:
        raise ConfigError(f"--seed {seed} + {len(prompts) * n} images exceeds the largest seed {MAX_SEED}")
    width, height = parse_size(args.size, "--size") if args.size is not None else (None, None)
    sampler, karras = sampler_and_grid(option_name, args.sampler, None)
    loras = tuple(Lora(path, 1.0 if weight is None else weight) for path, weight in lora_options(args))
    base = Recipe(
        mode=mode,
        prompt=prompts[0],
        negative_prompt=DEFAULTS["negative_prompt"] if args.negative is None else args.negative,
        seed=seed,
        steps=DEFAULTS["steps"] if args.steps is None else args.steps,
        guidance=DEFAULTS["guidance"] if args.guidance is None else args.guidance,
        guidance_interval=parse_guidance_interval(args.guidance_interval, args.guidance),
        sampler=sampler,
        karras=karras,
        loras=loras,
        width=width,
        height=height,
        eta=args.eta,
        strength=DEFAULT_STRENGTH[mode] if getattr(args, "strength", None) is None else args.strength,
        model=str(Path(args.model).absolute()),
        tokenizer=None if args.tokenizer is None else str(Path(args.tokenizer).absolute()),
        image=_input_path(args, "image", mode),
        mask=_input_path(args, "mask", mode),
        dtype=chosen_dtype(args.dtype, pick_device(args.device or "auto")),
    )
    images = []
    for p_index, prompt in enumerate(prompts):
        for k in range(n):
            images.append(base.replace(prompt=prompt, seed=seed + p_index * n + k).validated(option_name))
    return Job(images, batch_size, guidance_given=args.guidance is not None)


def _input_path(args: argparse.Namespace, name: str, mode: str) -> str | None:
    needed = mode == "inpaint" if name == "mask" else mode != "txt2img"
    if not needed:
        return None
    value = getattr(args, name, None)
    if value is None:
        raise ConfigError(f"--{name} FILE is required for {mode}")
    return str(Path(value).absolute())


# Options that may override a replayed PNG's recipe (explicitly given ones only) -> the field they set.
_OVERRIDES = {"model": "model", "tokenizer": "tokenizer", "negative": "negative_prompt", "steps": "steps",
              "guidance": "guidance", "guidance_interval": "guidance_interval", "eta": "eta", "strength": "strength",
              "image": "image", "mask": "mask", "dtype": "dtype"}  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields set by options given beside --replay (--sampler also sets karras)."""
    for option in ("n", "batch_size"):
        if getattr(args, option) is not None:
            raise ConfigError(f"--{option.replace('_', '-')} cannot be combined with --replay (it makes one image)")
    changes: dict[str, Any] = {}
    for option, field_name in _OVERRIDES.items():
        value = getattr(args, option, None)
        if value is not None:
            if option in ("model", "tokenizer", "image", "mask"):
                value = str(Path(value).absolute())
            if option == "dtype":
                value = chosen_dtype(value, pick_device(args.device or "auto"))
            value = parse_guidance_interval(value, args.guidance) if option == "guidance_interval" else value
            changes[field_name] = value
    if args.sampler is not None:
        changes["sampler"], changes["karras"] = sampler_and_grid(option_name, args.sampler, None)
    if args.prompt:
        if len(args.prompt) != 1:
            raise ConfigError("--replay takes at most one PROMPT (it makes one image)")
        changes["prompt"] = args.prompt[0]
    if args.seed is not None:
        changes["seed"] = parse_seed(args.seed)
    if args.size is not None:
        changes["width"], changes["height"] = parse_size(args.size, "--size")
    return changes


def job_from_replay(args: argparse.Namespace, mode: str) -> Job:
    """The one image ``--replay PNG`` asks for: its recorded recipe (or another tool's ``parameters`` text) with
    the options given beside it."""
    source = Path(args.replay)
    where = f"--replay {source}"
    settings = read_png_settings(source)
    if isinstance(settings, Parameters):
        return _job_from_parameters(args, mode, settings, where)
    recorded = recipe_from_metadata(settings, where)
    if recorded.mode != mode:
        raise ConfigError(f"{where} was made by 'diffusekit {recorded.mode}'; "
                          f"run 'diffusekit {recorded.mode} --replay {source}'")  # fmt: skip
    changes = _overrides(args)
    if changes.get("sampler") not in (None, "ddim") and "eta" not in changes:
        changes["eta"] = None  # the recorded DDIM eta means nothing to the sampler asked for
    loras, notes = replay_loras(recorded.loras, lora_options(args))
    if loras != recorded.loras:
        changes["loras"] = loras

    def name(field_name: str) -> str:  # an option the user gave, or the field of the PNG
        return option_name(field_name) if field_name in changes else f"{where}: field '{field_name}'"

    recipe = recorded.replace(**changes).validated(name)
    # the files may have moved; any other change makes a different image, so there is nothing to compare
    same_loras = [(x.name, x.weight, x.sha256) for x in loras] == [(x.name, x.weight, x.sha256) for x in recorded.loras]
    same_recipe = set(changes) <= {"model", "tokenizer", "image", "mask", "loras"} and same_loras
    guidance_given = "sampler" not in changes or "guidance" in changes  # another sampler: LCM may pick guidance
    return Job([recipe], 1, compare_with=source if same_recipe else None, name=name, guidance_given=guidance_given,
               notes=notes)  # fmt: skip


def _job_from_parameters(args: argparse.Namespace, mode: str, p: Parameters, where: str) -> Job:
    """--replay of another SD tool's PNG: its ``parameters`` settings with the model (and inputs) given."""
    if args.model is None:
        raise ConfigError(f"{where} was made by another tool: its 'parameters' text names no model file; pass "
                          "--model PATH to make it again with its settings")  # fmt: skip
    changes = _overrides(args)
    data: dict[str, Any] = {"mode": mode, **p.fields, **changes}
    notes = [f"{where} was made by another tool: its settings run on --model {changes['model']}; that tool's "
             "noise differs, so the image will not be the same"]  # fmt: skip
    if mode == "txt2img" and "strength" in data:
        data.pop("strength")  # the web UI records its hires fix's strength in txt2img images
        p.unused.append("Denoising strength")
    for field_name in ("image", "mask"):
        if field_name not in data:
            data[field_name] = _input_path(args, field_name, mode)
    given = lora_options(args)
    loras: list[dict[str, Any]] = []
    for tag, tag_weight in p.loras.items():  # <lora:NAME:WEIGHT> in the prompt names a file by its stem
        match = next(((path, w) for path, w in given if tag in (Path(path).stem, Path(path).name)), None)
        if match is None:
            raise ConfigError(f"{where}: its prompt uses the LoRA {tag!r} (<lora:{tag}:{tag_weight:g}>); pass "
                              "--lora FILE for it (its weight defaults to the prompt's)")  # fmt: skip
        loras.append({"path": match[0], "weight": tag_weight if match[1] is None else match[1]})
    named = {x["path"] for x in loras}
    loras += [{"path": path, "weight": 1.0 if w is None else w} for path, w in given if path not in named]
    data["loras"] = loras
    if p.unused:
        notes.append(f"{where}: not used: {', '.join(p.unused)}")

    def name(field_name: str) -> str:
        if field_name in changes or field_name not in PARAMETER_KEYS or field_name not in p.fields:
            return option_name(field_name)
        return f"{where}: '{PARAMETER_KEYS[field_name]}'"

    recipe = Recipe.from_dict(data, name=name)
    return Job([recipe], 1, name=name, notes=notes, guidance_given="guidance" in data)
