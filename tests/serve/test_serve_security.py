"""The server's security defaults: a token on every route when set, loopback names only without one, no
calls from other sites' pages, bounded JSON bodies, no client-chosen paths, an offline page; and the
command line refusing unsafe or malformed options before the model loads."""

from __future__ import annotations

import base64
import http.client
import re
from pathlib import Path

import pytest
from serving import MODEL, SMALL, needs_model, request, running

from diffusekit.cli.main import main

TOKEN = "s3cret-token-123"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-token"), token=TOKEN, max_body_bytes=64 << 10,
                 allowed_origins=("http://localhost:3000",)) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-open"), max_body_bytes=64 << 10) as s:
        yield s


def basic(password: str, user: str = "me") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/api/info", "/sdapi/v1/progress", "/docs", "/openapi.json",
                                  "/api/events"])  # fmt: skip
def test_every_route_needs_the_token(guarded, path):
    r = guarded.request("GET", path)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert guarded.request("GET", path, headers={"Authorization": "Bearer wrong-token-000"}).status == 401
    assert guarded.request("GET", path, headers=basic("wrong")).status == 401
    if path != "/api/events":  # a stream: its answer starts but never ends
        assert guarded.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert guarded.request("GET", path, headers=basic(TOKEN)).status == 200


def test_posts_need_the_token_too(guarded):
    body = {"prompt": "p", **SMALL}
    assert guarded.request("POST", "/sdapi/v1/txt2img", body).status == 401
    assert guarded.request("POST", "/sdapi/v1/interrupt").status == 401
    assert guarded.request("POST", "/sdapi/v1/txt2img", body, headers=basic(TOKEN)).status == 200


def test_without_a_token_only_loopback_host_names_are_answered(open_server):
    """A page that rebinds its own DNS name to 127.0.0.1 sends its own name as Host: refused."""
    assert open_server.request("GET", "/api/info").status == 200
    assert open_server.request("GET", "/api/info", headers={"Host": f"localhost:{open_server.port}"}).status == 200
    r = open_server.request("GET", "/api/info", headers={"Host": "attacker.example:80"})
    assert r.status == 421 and "--token" in r.json()["detail"]


def test_pages_of_other_origins_cannot_call_the_api(guarded, open_server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    evil = open_server.request("POST", "/sdapi/v1/interrupt", headers={"Origin": "http://attacker.example"})
    assert evil.status == 403 and "--allow-origin" in evil.json()["detail"]
    same = open_server.request("POST", "/sdapi/v1/interrupt", headers={"Origin": open_server.url})
    assert same.status == 200
    assert "access-control-allow-origin" not in same.headers  # CORS is off
    allowed = guarded.request("GET", "/api/info", headers={"Origin": "http://localhost:3000", **auth})
    assert allowed.status == 200
    assert guarded.request("GET", "/api/info", headers={"Origin": "null", **auth}).status == 403


def test_bodies_are_bounded_json(open_server):
    big = b'{"prompt": "' + b"x" * (70 << 10) + b'"}'
    r = open_server.request("POST", "/sdapi/v1/txt2img", raw=big, headers={"Content-Type": "application/json"})
    assert r.status == 413 and "--max-body-mib" in r.json()["detail"]
    conn = http.client.HTTPConnection("127.0.0.1", open_server.port, timeout=30)  # chunked: no Content-Length
    conn.request("POST", "/sdapi/v1/txt2img", body=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
    assert conn.getresponse().status == 413
    conn.close()
    r = open_server.request("POST", "/sdapi/v1/txt2img", raw=b'{"prompt": "p"}', headers={"Content-Type": "text/plain"})
    assert r.status == 415 and "application/json" in r.json()["detail"]
    for raw in (b"{", b"[" * 60_000, b'{"prompt": "p",}', b"\xff\xfe", b"1e999999"):
        r = open_server.request("POST", "/sdapi/v1/txt2img", raw=raw, headers={"Content-Type": "application/json"})
        assert r.status in (400, 422), (raw[:20], r.status, r.body)
    assert open_server.request("GET", "/sdapi/v1/progress").status == 200  # still serving


def test_no_route_reads_a_path_the_client_names(open_server):
    for path in ("/static/../../../../etc/passwd", "/static/%2e%2e%2fserving.py", "/static/index.html%00",
                 "/api/jobs/..%2f..%2fetc/images/0", "/static/__init__.py"):  # fmt: skip
        assert open_server.request("GET", path).status == 404, path
    job = open_server.request("POST", "/api/jobs", {"prompt": "p", **SMALL}).json()
    open_server.wait(job["id"])
    assert open_server.request("GET", f"/api/jobs/{job['id']}/images/0").status == 200
    assert open_server.request("GET", f"/api/jobs/{job['id']}/images/1").status == 404
    assert open_server.request("GET", f"/api/jobs/{job['id']}/images/-1").status == 404


def test_the_page_loads_nothing_from_elsewhere():
    static = Path(__file__).resolve().parents[2] / "src" / "diffusekit" / "serve" / "static"
    for name in ("index.html", "app.js", "style.css"):
        text = (static / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), name


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--host", "0.0.0.0"], "--token"),
        (["--host", "192.168.1.5", "--token", "short"], "--token"),
        (["--port", "70000"], "--port"),
        (["--queue-size", "0"], "--queue-size"),
        (["--max-body-mib", "0"], "--max-body-mib"),
        (["--preview-every", "-1"], "--preview-every"),
        (["--lora", "/nonexistent.safetensors"], "--lora"),
    ],
)
@needs_model
def test_the_command_line_refuses_unsafe_options_before_loading(capsys, argv, names):
    model = MODEL
    assert main(["serve", str(model), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusekit serve: error:") and names in err and "\n" not in err, err


def test_a_missing_model_is_one_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "MODEL" in capsys.readouterr().err


def test_loopback_is_the_default_bind():
    from diffusekit.cli.serve import DEFAULTS
    from diffusekit.serve.security import is_loopback

    assert DEFAULTS["host"] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_request_helper_reaches_the_server(open_server):
    assert request(open_server.port, "GET", "/sdapi/v1/samplers").status == 200
