"""Fuzz of the server's routes, counted like the loaders' fuzz (tests/fuzz/fuzzing.py): every hostile body,
field value or uploaded image is answered with 2xx or with a 4xx whose message names the field at fault --
never a 5xx, a hang or a crash -- and the server keeps serving. Accepted jobs are cancelled at once."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from serving import fuzzing, running

from diffusekit.errors import ConfigError
from diffusekit.serve.community import IMG2IMG_FIELDS, Limits

BASE = {"prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 2, "cfg_scale": 7.0, "width": 16, "height": 16,
        "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, "denoising_strength": 0.5}  # fmt: skip
NAMES = [f"'{f}'" for f in (*IMG2IMG_FIELDS, "mode")] + ["request body", "JSON"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-fuzz"), preview_every=None, max_body_bytes=1 << 20,
                 limits=Limits(max_side=64, max_batch=2, max_n_iter=2)) as s:  # fmt: skip
        yield s


@pytest.fixture
def tally(request):
    return fuzzing.session_tally(request)


def answer(server, method: str, path: str, *, body=None, raw: bytes | None = None):
    """The request's JSON answer; a ConfigError carrying the message of a 4xx; AssertionError for anything
    else (a 5xx, an answer that is not JSON), which the tally reports as an escape."""
    headers = {"Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode("utf-8")
    r = server.request(method, path, raw=data, headers=headers, timeout=30)
    if r.status >= 500:
        raise AssertionError(f"HTTP {r.status}: {r.body[:300]!r}")
    reply = r.json()
    if 400 <= r.status < 500:
        assert isinstance(reply.get("detail"), str) and reply["detail"], reply
        raise ConfigError(reply["detail"])
    if path == "/api/jobs":
        server.request("POST", f"/api/jobs/{reply['id']}/cancel")  # accepted: no need to run it
    return reply


def still_serving(server) -> None:
    assert server.request("GET", "/sdapi/v1/progress", timeout=30).status == 200


@given(body=fuzzing.mutated(BASE, fuzzing.string_values(BASE) + ["Euler a", "DDIM", "-1", "NaN"], max_ops=3),
       mode=st.sampled_from(["txt2img", "img2img"]))  # fmt: skip
@fuzzing.examples(120)
def test_fuzz_job_fields(server, tally, body, mode):
    if mode == "img2img":
        body = {**body, "init_images": [_png(16, 16)]}
    tally.check("serve: job fields", lambda: answer(server, "POST", "/api/jobs", body={**body, "mode": mode}),
                names=NAMES, describe=lambda: json.dumps(body)[:2000])  # fmt: skip
    still_serving(server)


def _png(width: int, height: int, mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _images() -> st.SearchStrategy:
    valid = base64.b64decode(_png(16, 16))
    as_b64 = st.binary(max_size=512).map(lambda b: base64.b64encode(b).decode())
    return st.one_of(
        as_b64,
        st.integers(1, len(valid) - 1).map(lambda n: base64.b64encode(valid[:n]).decode()),  # truncated
        st.tuples(st.integers(8, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: base64.b64encode(valid[: t[0]] + bytes([t[1]]) + valid[t[0] + 1 :]).decode()),  # one byte flipped
        st.sampled_from([(1, 1), (0, 5), (5000, 5000), (2**31 - 1, 2**31 - 1), (1, 10**6), (64, 64)]).map(
            lambda wh: base64.b64encode(_forged_png(*wh)).decode()),
        st.sampled_from([_png(16, 16), _png(24, 8, "L"), _png(16, 16, "RGBA"), _png(16, 16, "P"), _png(16, 16, "I;16"),
                         "data:image/png;base64," + _png(16, 16), _png(16, 16)[:-2], "", "====", "A" * 4097]),
        fuzzing.json_values(4),
    )  # fmt: skip


@given(image=_images(), mask=st.one_of(st.none(), _images()), where=st.sampled_from(["init", "mask", "png-info"]))
@fuzzing.examples(120)
def test_fuzz_uploaded_images(server, tally, image, mask, where):
    if where == "png-info":
        call = lambda: answer(server, "POST", "/sdapi/v1/png-info", body={"image": image})  # noqa: E731
        names = ["'image'", "request body"]
    else:
        body = {**BASE, "mode": "img2img", "init_images": [image]}
        if mask is not None:
            body["mask"] = mask
        call = lambda: answer(server, "POST", "/api/jobs", body=body)  # noqa: E731
        names = ["'init_images'", "'mask'", "'width'"]
    tally.check(f"serve: uploaded images ({where})", call, names=names, describe=lambda: repr(image)[:300])
    still_serving(server)


@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                     fuzzing.json_values(6).map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/api/jobs", "/sdapi/v1/png-info"]))  # fmt: skip
@fuzzing.examples(120)
def test_fuzz_raw_bodies(server, tally, raw, path):
    tally.check(f"serve: raw bodies ({path})", lambda: answer(server, "POST", path, raw=raw),
                names=[*NAMES, "'image'"], describe=lambda: repr(raw[:300]))  # fmt: skip
    still_serving(server)
