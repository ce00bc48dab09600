"""``guidance_interval`` in a request to the server (Kynkäänniemi et al. 2024: guidance only at noise levels
lo < sigma <= hi), against a real server with the tiny fixture pipeline: accepted and run as the library runs it,
reported back and read from a PNG; a bad one is a 422 naming the field."""

from __future__ import annotations

import math

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
    with running(tmp_path_factory.mktemp("serve-interval")) as s:
        yield s


def library_txt2img(seed: int, **kw) -> np.ndarray:
    result = TextToImage(tiny_model())(["a fox"], negative_prompt=[""], height=16, width=16, steps=3,
                                       generator=generators_from_seeds([seed], 1), show_progress=False,
                                       **kw)  # fmt: skip
    return pixels(to_pil(result.images)[0])


@pytest.mark.parametrize(("sent", "interval"), [([0.28, 5.42], (0.28, 5.42)), ([1, None], (1.0, math.inf))])
def test_an_interval_is_accepted_and_runs_as_the_library_runs_it(server, sent, interval):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a fox", "seed": 5, "guidance_interval": sent,
                                                     "sampler_name": "Euler", **SMALL})  # fmt: skip
    assert r.status == 200, r.body
    data = r.json()
    assert data["parameters"]["guidance_interval"] == [float(v) if v is not None else None for v in sent]
    assert "guidance_interval" not in data["parameters"].get("ignored_fields", [])
    got = pixels(decode_png(data["images"][0]))
    np.testing.assert_array_equal(got, library_txt2img(5, sampler="euler", guidance_interval=interval))
    assert not np.array_equal(got, library_txt2img(5, sampler="euler"))  # not silently ignored
    info = server.request("POST", "/sdapi/v1/png-info", {"image": data["images"][0]}).json()
    assert info["parameters"]["guidance_interval"] == data["parameters"]["guidance_interval"]
    assert "Guidance interval: " in info["info"]


def test_without_an_interval_nothing_changes(server):
    r = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a fox", "seed": 6, "guidance_interval": None,
                                                     "sampler_name": "Euler", **SMALL})  # fmt: skip
    assert r.status == 200, r.body
    assert "guidance_interval" not in r.json()["parameters"]
    np.testing.assert_array_equal(pixels(decode_png(r.json()["images"][0])), library_txt2img(6, sampler="euler"))


def test_the_job_api_and_img2img_take_it_too(server):
    r = server.request("POST", "/api/jobs", {"prompt": "a fox", "seed": 2, "guidance_interval": [0.5, 2], **SMALL})
    assert r.status == 202, r.body
    job = server.wait(r.json()["id"])
    assert job["state"] == "done" and job["settings"]["guidance_interval"] == [0.5, 2.0]
    assert "guidance_interval" not in job["ignored_fields"]

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    body = {"prompt": "a house", "init_images": [png_b64(init)], "denoising_strength": 1.0, "seed": 3, "steps": 3,
            "sampler_name": "Euler", "guidance_interval": [0.5, None]}  # fmt: skip
    r = server.request("POST", "/sdapi/v1/img2img", body)
    assert r.status == 200, r.body
    result = ImageToImage(tiny_model())(["a house"], pil_to_tensor(init, "RGB")[None], strength=1.0, steps=3,
                                        sampler="euler", negative_prompt=[""], generator=generators_from_seeds([3], 1),
                                        guidance_interval=(0.5, math.inf), show_progress=False)  # fmt: skip
    np.testing.assert_array_equal(pixels(decode_png(r.json()["images"][0])), pixels(to_pil(result.images)[0]))


BAD = [[5, 1], "12", [0, "x"], [1, 2, 3], [True, 2], [None, 1], {"lo": 0}, 0.28, [-1, 2], [1e999, 1e999], [0, 10**400]]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_interval_is_a_422_naming_the_field(server, bad):
    for path, extra in (("/sdapi/v1/txt2img", {}), ("/api/jobs", {"mode": "txt2img"})):
        r = server.request("POST", path, {"prompt": "p", **SMALL, "guidance_interval": bad, **extra})
        assert r.status == 422, (path, r.body)
        assert "field 'guidance_interval'" in r.json()["detail"], r.json()


def test_the_schema_describes_the_field(server):
    schema = server.request("GET", "/openapi.json").json()
    body = schema["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["guidance_interval"]["type"] == "array"
