"""Shared machinery of the server tests (``tests/serve/test_serve_*.py``); holds no tests itself.

A server runs in a thread of the test process (uvicorn on a free loopback port, the tiny fixture pipeline
loaded once per session) and is spoken to over real HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the server's packages are the 'serve' extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the server's packages are the 'serve' extra")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))  # tests/fuzz/fuzzing.py, for the fuzz tests

import fuzzing  # noqa: E402, F401 - re-exported: ``from serving import fuzzing``
from diffusekit.pipelines.loading import load_pipeline  # noqa: E402
from diffusekit.serve.app import create_app  # noqa: E402
from diffusekit.serve.community import Limits  # noqa: E402
from diffusekit.serve.service import Service, Settings  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
MODEL = FIXTURES / "pipelines" / "stable_diffusion"
# tests that start a server process on the fixture model skip (and say why) where ../shared is not checked out
needs_model = pytest.mark.skipif(not MODEL.is_dir(), reason=f"the fixture model is not at {MODEL}")
SMALL = {"width": 16, "height": 16, "steps": 3}  # a tiny, fast request for the fixture model

_SD: list[Any] = []


def pixels(im: Any) -> Any:
    """A PIL image's RGB pixels as a numpy array (to compare a server's image with the library's)."""
    import numpy as np

    return np.asarray(im.convert("RGB"))


def tiny_model() -> Any:
    """The fixture pipeline, loaded once per test session (each server's worker uses it in turn)."""
    if not MODEL.is_dir():
        pytest.skip(f"reference fixtures not found at {MODEL}")
    if not _SD:
        _SD.append(load_pipeline(MODEL))
    return _SD[0]


@dataclass
class Running:
    """A server running in a thread: its base URL and service; ``stop()`` shuts it down."""

    url: str
    port: int
    service: Service
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def request(self, method: str, path: str, body: Any = None, *, headers: dict | None = None,
                raw: bytes | None = None, timeout: float = 60) -> Reply:  # fmt: skip
        return request(self.port, method, path, body, headers=headers, raw=raw, timeout=timeout)

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        """Poll the job until it finished; its JSON."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.request("GET", f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def start_server(out: Path, *, token: str | None = None, preview_every: float | None = 0.0, queue_size: int = 64,
                 max_body_bytes: int = 4 << 20, limits: Limits | None = None,
                 allowed_origins: tuple[str, ...] = ()) -> Running:  # fmt: skip
    """A server over the tiny model on a free loopback port, results in ``out``."""
    sd = tiny_model()
    settings = Settings(model=str(MODEL), out=out, queue_size=queue_size, max_body_bytes=max_body_bytes,
                        preview_every=preview_every, limits=limits or Limits(max_side=256))  # fmt: skip
    service = Service(sd, settings)
    app = create_app(service, token=token, allowed_origins=allowed_origins)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return Running(f"http://127.0.0.1:{port}", port, service, server, thread)


@contextlib.contextmanager
def running(out: Path, **kwargs: Any) -> Iterator[Running]:
    server = start_server(out, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: Any = None, *, headers: dict | None = None,
            raw: bytes | None = None, timeout: float = 60, host: str = "127.0.0.1") -> Reply:  # fmt: skip
    """One HTTP request to the server on ``port``; ``body`` is sent as JSON, ``raw`` as it is."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        h = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def png_b64(image: Image.Image, text: dict[str, str] | None = None) -> str:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im
