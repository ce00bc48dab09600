"""The recipe's ``guidance_interval`` (Kynkäänniemi et al. 2024: guidance only at noise levels lo < sigma <= hi):
validation in the caller's words, standard JSON with an open upper end as null, PNG metadata and ``parameters``
text, the PNGs of earlier versions (which lack the field: guidance at every step), and the run it makes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from diffusekit.errors import ConfigError
from diffusekit.pipelines import loading
from diffusekit.pipelines.recipe import (
    METADATA_VERSION,
    PARAMETERS_KEY,
    READ_VERSIONS,
    Recipe,
    generate,
    interval_to_json,
    png_text,
    read_png_metadata,
    recipe_from_metadata,
    recipe_from_parameters,
    resolve,
    to_metadata,
)

BODY = {"mode": "txt2img", "prompt": "a fox", "model": "/models/sd15"}


def test_an_interval_round_trips_through_standard_json():
    r = Recipe.from_dict({**BODY, "guidance_interval": [0.28, 5.42]})
    assert r.guidance_interval == (0.28, 5.42)
    assert r.to_dict()["guidance_interval"] == [0.28, 5.42]
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    ints = Recipe.from_dict({**BODY, "guidance_interval": [0, 5]})  # JSON writes 5.0 as 5
    assert ints.guidance_interval == (0.0, 5.0) and all(type(v) is float for v in ints.guidance_interval)


def test_an_open_upper_end_is_null_in_json_and_infinity_in_the_recipe():
    r = Recipe.from_dict({**BODY, "guidance_interval": [0.28, None]})
    assert r.guidance_interval == (0.28, math.inf)
    text = r.to_json()  # allow_nan=False: it would raise on an infinity
    assert '"guidance_interval": [0.28, null]' in text and "Infinity" not in text
    assert Recipe.from_dict(json.loads(text)) == r
    assert r.replace(guidance_interval=(0.28, math.inf)).validated() == r  # as the command line builds it
    assert interval_to_json((0.0, math.inf)) == [0.0, None] and interval_to_json(None) is None


def test_no_interval_is_none_everywhere():
    r = Recipe.from_dict(BODY)
    assert r.guidance_interval is None and r.to_dict()["guidance_interval"] is None
    assert Recipe.from_dict({**BODY, "guidance_interval": None}) == r


@pytest.mark.parametrize(
    "bad",
    [[5, 1], [1, 1], [-1, 2], "12", "0.28,5.42", [0, "x"], ["0.28", "5.42"], [True, 2], [1, 2, 3], [1], [],
     [None, 2], {"lo": 1, "hi": 2}, 3.0, [0, 10**400], [math.nan, 1], [0, math.nan]],
)  # fmt: skip
def test_a_bad_interval_is_refused_naming_the_field(bad):
    with pytest.raises(ConfigError, match="^field 'guidance_interval' must "):
        Recipe.from_dict({**BODY, "guidance_interval": bad})
    with pytest.raises(ConfigError, match="^--guidance-interval must "):  # the caller's vocabulary
        Recipe.from_dict({**BODY, "guidance_interval": bad}, name=lambda f: "--" + f.replace("_", "-"))


def test_messages_give_the_allowed_form():
    with pytest.raises(ConfigError, match=r"must be \[LO, HI\], two noise levels sigma .* e\.g\. \[0\.28, 5\.42\]"):
        Recipe.from_dict({**BODY, "guidance_interval": "12"})
    with pytest.raises(ConfigError, match=r"must satisfy 0 <= LO < HI .* got 5,1"):
        Recipe.from_dict({**BODY, "guidance_interval": [5, 1]})
    with pytest.raises(ConfigError, match="field 'guidance_interval'"):  # a replace() is checked by validated()
        Recipe.from_dict(BODY).replace(guidance_interval=(3.0, 2.0)).validated()


def _write_png(path: Path, meta: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    for k, v in png_text(meta).items():
        info.add_text(k, v)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("interval", [[0.28, 5.42], [0.5, None]])
def test_png_metadata_and_parameters_text_carry_the_interval(tmp_path, interval):
    r = Recipe.from_dict({**BODY, "guidance_interval": interval})
    meta = to_metadata(r, width=64, height=64, sampler="pndm", provenance={})
    assert meta["format_version"] == METADATA_VERSION == 3 and 3 in READ_VERSIONS
    path = _write_png(tmp_path / "x.png", meta)
    read = read_png_metadata(path)
    assert read["guidance_interval"] == interval
    assert recipe_from_metadata(read, "x") == r.replace(width=64, height=64, sampler="pndm")
    with Image.open(path) as im:
        text = im.info[PARAMETERS_KEY]
    shown = "(0.28, 5.42]" if interval[1] else "(0.5, inf]"
    assert f'CFG scale: 7.5, Guidance interval: "{shown}", Seed: 0,' in text
    p = recipe_from_parameters(text, "w")  # read back (a PNG whose JSON chunk was stripped)
    assert p.fields["guidance_interval"] == interval and "Guidance interval" not in p.unused
    assert Recipe.from_dict({**BODY, **p.fields}).guidance_interval == r.guidance_interval


def test_without_an_interval_the_parameters_text_does_not_mention_it():
    meta = to_metadata(Recipe.from_dict(BODY), width=64, height=64, sampler="pndm", provenance={})
    assert "Guidance interval" not in png_text(meta)[PARAMETERS_KEY]
    assert "guidance_interval" not in recipe_from_parameters(png_text(meta)[PARAMETERS_KEY], "w").fields


@pytest.mark.parametrize("value", ['"(a, 2]"', '"0.28,5.42"', '"(1, 2, 3]"', "(1"])
def test_a_malformed_parameters_interval_names_its_key(value):
    with pytest.raises(ConfigError, match=r"^w: 'Guidance interval' must be \(LO, HI\]"):
        recipe_from_parameters(f"x\nSteps: 20, Sampler: Euler, Guidance interval: {value}, Seed: 1", "w")


@pytest.mark.parametrize("version", [1, 2])
def test_metadata_of_earlier_versions_without_the_field_replays_with_guidance_at_every_step(version):
    """PNGs written before the field existed (format_version 1 and 2) lack it: it reads as None."""
    meta = to_metadata(Recipe.from_dict(BODY), width=64, height=64, sampler="pndm", provenance={})
    dropped = ("guidance_interval", "karras", "loras") if version == 1 else ("guidance_interval",)
    old = {k: v for k, v in meta.items() if k not in dropped} | {"format_version": version}
    r = recipe_from_metadata(old, "x")
    assert r.guidance_interval is None
    assert r == Recipe.from_dict(BODY).replace(width=64, height=64, sampler="pndm")


def test_an_old_style_recipe_dict_without_the_field_reads_as_none():
    """A complete recipe as an earlier version wrote it (every field of its time, no guidance_interval)."""
    old = {"mode": "txt2img", "prompt": "a fox", "negative_prompt": "", "seed": 3, "steps": 20, "guidance": 7.0,
           "sampler": "ddim", "width": 64, "height": 64, "eta": 0.0, "strength": None, "model": "/m",
           "tokenizer": None, "image": None, "mask": None, "dtype": "float32", "karras": False,
           "loras": []}  # fmt: skip
    assert Recipe.from_dict(old).guidance_interval is None
    meta = {"format": "diffusekit-generation", "format_version": 2, "diffusekit_version": "0.x", **old}
    assert recipe_from_metadata(meta, "x").guidance_interval is None


def test_current_metadata_must_have_the_field():
    meta = to_metadata(Recipe.from_dict(BODY), width=64, height=64, sampler="pndm", provenance={})
    with pytest.raises(ConfigError, match="^x: the metadata lacks guidance_interval$"):
        recipe_from_metadata({k: v for k, v in meta.items() if k != "guidance_interval"}, "x")
    with pytest.raises(ConfigError, match="^x: field 'guidance_interval' must satisfy 0 <= LO < HI"):
        recipe_from_metadata({**meta, "guidance_interval": [5, 1]}, "x")


def test_generate_runs_the_recipes_interval(sd_folder):
    """The recipe reaches the pipeline: an interval above every level is guidance 1, bit for bit."""
    sd = loading.load_pipeline(sd_folder)
    base = Recipe.from_dict({**BODY, "model": str(sd_folder), "width": 16, "height": 16, "steps": 3, "seed": 4})
    resolved = resolve(base, sd)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outside, unguided, guided = (
            generate(sd, [r], resolved)[0]
            for r in (base.replace(guidance_interval=(1e6, math.inf)), base.replace(guidance=1.0), base)
        )
    finally:
        torch.set_num_threads(before)
    assert outside.tobytes() == unguided.tobytes() and outside.tobytes() != guided.tobytes()
