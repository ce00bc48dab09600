"""The community API subset against a real server on a loopback port, with the tiny fixture pipeline:
images equal the library's own output for the same seeds, the answer has the web UI's shape, a script
written against the published schema works unchanged, and bad fields are a 4xx naming the field."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from serving import SMALL, decode_png, pixels, png_b64, running, tiny_model

from diffusekit.io.images import pil_to_tensor, to_pil
from diffusekit.pipelines.common import generators_from_seeds
from diffusekit.pipelines.img2img import ImageToImage
from diffusekit.pipelines.text_to_image import TextToImage


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-api")) as s:
        yield s


def library_txt2img(prompt: str, seeds: list[int], **kw) -> list[np.ndarray]:
    sd = tiny_model()
    result = TextToImage(sd)([prompt] * len(seeds), negative_prompt=[""] * len(seeds), height=16, width=16,
                             generator=generators_from_seeds(seeds, len(seeds)), show_progress=False, **kw)  # fmt: skip
    return [pixels(im) for im in to_pil(result.images)]


def test_txt2img_images_equal_the_library_output_for_the_same_seeds(server):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a red fox", "seed": 40, "n_iter": 2, **SMALL})
    assert r.status == 200, r.body
    data = r.json()
    assert set(data) == {"images", "parameters", "info"}
    assert isinstance(data["info"], str)  # the web UI sends info as a JSON string
    info = json.loads(data["info"])
    assert info["all_seeds"] == [40, 41]
    expected = library_txt2img("a red fox", [40], steps=3) + library_txt2img("a red fox", [41], steps=3)
    got = [pixels(decode_png(b)) for b in data["images"]]
    assert len(got) == 2
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert not np.array_equal(got[0], got[1])  # the seeds differ, so do the images


def test_a_karras_schedule_is_the_web_uis_karras_sampler(server):
    body = {"prompt": "p", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 1, **SMALL}
    r = server.request("POST", "/sdapi/v1/txt2img", body)
    assert r.status == 200, r.body
    assert r.json()["parameters"]["sampler_name"] == "DPM++ 2M Karras"
    plain = server.request("POST", "/sdapi/v1/txt2img", {**body, "scheduler": "Automatic"}).json()
    assert plain["parameters"]["sampler_name"] == "DPM++ 2M"
    assert plain["images"][0] != r.json()["images"][0]  # another grid, another image


def test_a_network_batch_equals_the_library_batch(server):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a boat", "seed": 7, "batch_size": 2,
                                                     "sampler_name": "Euler a", "cfg_scale": 3, **SMALL})  # fmt: skip
    assert r.status == 200, r.body
    expected = library_txt2img("a boat", [7, 8], steps=3, sampler="euler_ancestral", guidance_scale=3.0)
    got = [pixels(decode_png(b)) for b in r.json()["images"]]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert r.json()["parameters"]["sampler_name"] == "Euler a"


def test_img2img_equals_the_library_output(server):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    body = {"prompt": "a house", "init_images": [png_b64(init)], "denoising_strength": 0.5, "seed": 3, "steps": 4,
            "sampler_name": "DDIM"}  # fmt: skip
    r = server.request("POST", "/sdapi/v1/img2img", body)
    assert r.status == 200, r.body
    sd = tiny_model()
    result = ImageToImage(sd)(["a house"], pil_to_tensor(init, "RGB")[None], strength=0.5, steps=4, sampler="ddim",
                              negative_prompt=[""], generator=generators_from_seeds([3], 1),
                              show_progress=False)  # fmt: skip
    np.testing.assert_array_equal(pixels(decode_png(r.json()["images"][0])), pixels(to_pil(result.images)[0]))
    assert r.json()["parameters"]["denoising_strength"] == 0.5


def test_a_script_written_for_the_web_ui_works_unchanged(server):
    """What such scripts do: post the payload with the web UI's fields and defaults, decode every image, read
    the seed from info. Unknown fields are ignored and listed."""
    payload = {"prompt": "puppy dog", "negative_prompt": "", "seed": -1, "sampler_name": "Euler", "batch_size": 1,
               "n_iter": 1, "steps": 2, "cfg_scale": 7, "width": 16, "height": 16, "restore_faces": False,
               "tiling": False, "eta": 0, "s_noise": 1, "override_settings": {}, "send_images": True,
               "save_images": False, "styles": [], "enable_hr": False}  # fmt: skip
    req = urllib.request.Request(f"{server.url}/sdapi/v1/txt2img", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as response:
        r = json.loads(response.read())
    for i in r["images"]:
        image = decode_png(i.split(",", 1)[0])
        assert image.size == (16, 16)
        assert "parameters" in image.info  # the PNG carries its settings as the web UI's do
    info = json.loads(r["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]
    assert {"restore_faces", "tiling", "s_noise", "override_settings", "styles", "enable_hr", "eta"} <= set(
        info["ignored_fields"]
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"cfg_scale": float("1e999")}, "cfg_scale"),
        ({"width": 17, "height": 16}, "width"),
        ({"width": 4096, "height": 4096}, "width"),
        ({"height": None}, "width"),  # width without height
        ({"batch_size": 0}, "batch_size"),
        ({"n_iter": 10**6}, "n_iter"),
        ({"sampler_name": "Euler z"}, "sampler_name"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"scheduler": "Karras"}, "scheduler"),  # the model's own sampler (PLMS) walks no sigma grid
        ({"seed": -2}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"send_images": "yes"}, "send_images"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(server, body, field):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "p", **SMALL, **body})
    assert r.status == 422, r.body
    assert f"'{field}'" in r.json()["detail"], r.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"init_images": None}, "init_images"),
        ({"init_images": "abc"}, "init_images"),
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"GIF89a junk").decode()]}, "init_images"),
        ({"init_images": ["A"], "denoising_strength": 2}, "denoising_strength"),
        ({"denoising_strength": 0.1, "steps": 3}, "denoising_strength"),
    ],
)
def test_bad_img2img_fields_are_refused_naming_the_field(server, body, field):
    good = png_b64(Image.new("RGB", (16, 16), "gray"))
    full = {"prompt": "p", "steps": 3, "init_images": [good], **body}
    r = server.request("POST", "/sdapi/v1/img2img", full)
    assert r.status == 422, r.body
    assert f"'{field}'" in r.json()["detail"], r.json()


def test_an_input_larger_than_the_servers_sides_is_refused(server):
    """img2img without width/height runs at the input's own size, which --max-side bounds too."""
    big = png_b64(Image.new("RGB", (512, 64)))
    r = server.request("POST", "/sdapi/v1/img2img", {"prompt": "p", "steps": 3, "init_images": [big]})
    assert r.status == 422 and "field 'init_images' is 512x64 pixels" in r.json()["detail"], r.json()
    r = server.request("POST", "/sdapi/v1/img2img", {"prompt": "p", "steps": 3, "init_images": [big], "width": 16,
                                                     "height": 16, "send_images": False})  # fmt: skip
    assert r.status == 200 and r.json()["images"] == []  # resized to 16x16; send_images false sends none


@pytest.mark.parametrize("side", [5_000, 30_000])
def test_a_png_bomb_is_refused_from_its_header(server, side):
    """A small PNG that claims side x side pixels: refused before its pixels are inflated (5000: by our
    limit; 30000: Pillow refuses it first, and says so in our words)."""
    bomb = png_b64(Image.new("1", (side, side)))
    assert len(bomb) < 200_000
    r = server.request("POST", "/sdapi/v1/img2img", {"prompt": "p", "steps": 3, "init_images": [bomb]})
    assert r.status == 422 and "more than 16777216 pixels" in r.json()["detail"], r.json()
    assert "field 'init_images'" in r.json()["detail"]
    assert server.request("GET", "/sdapi/v1/progress").status == 200  # still serving


def test_listing_routes(server):
    samplers = server.request("GET", "/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M", "PLMS"} <= set(names)
    models = server.request("GET", "/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "stable_diffusion" and models[0]["title"].startswith("stable_diffusion")
    assert server.request("GET", "/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]


def test_png_info_reads_back_a_generated_image_and_a_web_ui_png(server):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a tree", "negative_prompt": "fog", "seed": 11,
                                                     "sampler_name": "DDIM", "cfg_scale": 5.5, **SMALL})  # fmt: skip
    made = r.json()["images"][0]
    info = server.request("POST", "/sdapi/v1/png-info", {"image": made}).json()
    p = info["parameters"]
    assert (p["prompt"], p["negative_prompt"], p["seed"], p["steps"], p["cfg_scale"], p["sampler_name"]) == (
        "a tree", "fog", 11, 3, 5.5, "DDIM")  # fmt: skip
    assert (p["width"], p["height"]) == (16, 16) and "diffusekit" in info["items"]
    text = ("a castle, dramatic light\nNegative prompt: ugly, \"blurry\"\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 6.5,"
            " Seed: 1234, Size: 512x768, Model hash: abc123, Model: sd15, Lora hashes: \"a: 1, b: 2\"")  # fmt: skip
    foreign = png_b64(Image.new("RGB", (8, 8)), {"parameters": text})
    info = server.request("POST", "/sdapi/v1/png-info", {"image": foreign}).json()
    p = info["parameters"]
    assert info["info"] == text
    assert p["prompt"] == "a castle, dramatic light" and p["negative_prompt"] == 'ugly, "blurry"'
    assert (p["steps"], p["sampler_name"], p["cfg_scale"], p["seed"], p["width"], p["height"]) == (
        30, "DPM++ 2M", 6.5, 1234, 512, 768)  # fmt: skip


def test_progress_advances_and_interrupt_stops_a_long_job(server):
    job = server.request("POST", "/api/jobs", {"prompt": "long", "steps": 400, "width": 16, "height": 16}).json()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = server.request("GET", "/sdapi/v1/progress").json()
        if p["state"]["job"] == job["id"] and p["state"]["sampling_step"] > 0:
            seen.append(p)
            if len(seen) >= 3 and seen[-1]["progress"] > seen[0]["progress"]:
                break
        time.sleep(0.05)
    assert len(seen) >= 3 and seen[-1]["progress"] > seen[0]["progress"] > 0
    assert seen[-1]["state"]["sampling_steps"] == 400 and seen[-1]["eta_relative"] > 0
    assert seen[-1]["current_image"]  # the preview of the current estimate
    assert decode_png(seen[-1]["current_image"]).size == (16, 16)
    stopped_at = time.monotonic()
    assert server.request("POST", "/sdapi/v1/interrupt").json()["interrupted"] == job["id"]
    done = server.wait(job["id"])
    assert time.monotonic() - stopped_at < 5
    assert done["state"] == "cancelled" and done["step"] < 400 and done["images"] == []
    assert server.request("GET", "/sdapi/v1/progress").json()["progress"] == 0.0


def test_the_step_callback_reaches_the_sampler():
    """recipe.generate passes ``callback`` to the pipelines: one call per sampler step (the server's
    progress, previews and cancellation ride on it)."""
    from diffusekit.pipelines.recipe import Recipe, generate, resolve

    sd = tiny_model()
    recipe = Recipe.from_dict({"mode": "txt2img", "prompt": "x", "model": "m", "steps": 4, "width": 16, "height": 16})
    steps = []
    generate(sd, [recipe], resolve(recipe, sd), callback=lambda info: steps.append(info.index))
    assert steps == [0, 1, 2, 3]


def test_control_another_seed_gives_other_pixels():
    """Control for the equality tests: the fixture model's images depend on the seed, so equality with the
    library's output for the same seed is not vacuous."""
    a, b = library_txt2img("z", [1], steps=2), library_txt2img("z", [2], steps=2)
    assert not np.array_equal(a[0], b[0])


def test_a_mask_makes_img2img_an_inpainting_equal_to_the_library(server):
    from diffusekit.pipelines.inpaint import Inpaint

    init = Image.new("RGB", (16, 16), "gray")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    body = {"prompt": "a door", "init_images": [png_b64(init)], "mask": png_b64(mask), "denoising_strength": 1.0,
            "seed": 9, **SMALL}  # fmt: skip
    r = server.request("POST", "/sdapi/v1/img2img", body)
    assert r.status == 200, r.body
    result = Inpaint(tiny_model())(["a door"], pil_to_tensor(init, "RGB")[None], pil_to_tensor(mask, "L")[None],
                                   strength=1.0, steps=3, negative_prompt=[""], generator=generators_from_seeds([9], 1),
                                   show_progress=False)  # fmt: skip
    np.testing.assert_array_equal(pixels(decode_png(r.json()["images"][0])), pixels(to_pil(result.images)[0]))
    jobs = server.request("GET", "/api/jobs").json()["jobs"]
    assert jobs[-1]["mode"] == "inpaint"
