"""The HTTP routes: the community API subset under ``/sdapi/v1``, the native job API under ``/api``, the page
at ``/`` (its files are a fixed set shipped in the package: no route reads a path the client names), and the
OpenAPI page at ``/docs``. Every route sits behind :class:`~diffusekit.serve.security.Guard`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from diffusekit import __version__
from diffusekit.errors import ConfigError, DiffusekitError, OutputError
from diffusekit.serve.community import IMG2IMG_FIELDS, TXT2IMG_FIELDS, samplers_list
from diffusekit.serve.jobs import FINISHED, Job, NotFound, QueueFull
from diffusekit.serve.security import Guard
from diffusekit.serve.service import Service

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}  # fmt: skip
EVENT_POLL_S = 0.1  # how often the event stream looks for changes
KEEPALIVE_S = 15.0


class BadRequest(DiffusekitError):
    """A body that is not JSON (HTTP 400)."""


class Conflict(DiffusekitError):
    """An action that the job's state does not allow (HTTP 409)."""


STATUS = ((QueueFull, 429), (NotFound, 404), (BadRequest, 400), (Conflict, 409), (ConfigError, 422),
          (OutputError, 507))  # fmt: skip


def create_app(service: Service, *, token: str | None = None, allowed_origins: Iterable[str] = ()) -> Guard:
    """The ASGI app of ``service`` (started and stopped with the app's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not service.worker.is_alive():
            service.start()
        yield
        await run_in_threadpool(service.stop)

    app = FastAPI(title="diffusekit serve", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion over HTTP: the community /sdapi/v1 API subset and a job "
                  "queue.")  # fmt: skip
    files = {name: resources.files("diffusekit.serve").joinpath("static", name).read_bytes() for name in STATIC}

    @app.exception_handler(DiffusekitError)
    async def refused(request: Request, e: DiffusekitError) -> JSONResponse:
        status = next((code for kind, code in STATUS if isinstance(e, kind)), 500)
        headers = {"Retry-After": "5"} if status == 429 else None
        return JSONResponse({"error": type(e).__name__, "detail": " ".join(str(e).split())}, status, headers)

    # ------------------------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(files["index.html"], media_type=STATIC["index.html"], headers=_NO_STORE)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            raise NotFound(f"no file {name[:80]!r}")
        return Response(files[name], media_type=STATIC[name], headers=_NO_STORE)

    # ------------------------------------------------------------------------------------ community API
    @app.post("/sdapi/v1/txt2img", tags=["sdapi"], openapi_extra=_body_schema(TXT2IMG_FIELDS))
    async def txt2img(request: Request) -> dict[str, Any]:
        """Generate images from text; answers when they are done: ``{images: [base64 PNG], parameters, info}``."""
        return await _run_sync(service, await _json(request), "txt2img")

    @app.post("/sdapi/v1/img2img", tags=["sdapi"], openapi_extra=_body_schema(IMG2IMG_FIELDS))
    async def img2img(request: Request) -> dict[str, Any]:
        """Redraw ``init_images[0]`` (with ``mask``: repaint its white part); answers like txt2img."""
        return await _run_sync(service, await _json(request), "img2img")

    @app.get("/sdapi/v1/progress", tags=["sdapi"])
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The running job: progress 0-1, eta_relative (s), sampling step, current_image (base64 preview)."""
        return service.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt() -> dict[str, Any]:
        """Stop the running job at the sampler's next step (queued jobs go on)."""
        job = service.interrupt()
        return {"interrupted": job.id if job is not None else None}

    @app.get("/sdapi/v1/samplers", tags=["sdapi"])
    async def samplers() -> list[dict[str, Any]]:
        return samplers_list()

    @app.get("/sdapi/v1/sd-models", tags=["sdapi"])
    async def sd_models() -> list[dict[str, Any]]:
        """The one model this server holds."""
        short = service.fingerprint.get("model_weights", "")[:10]
        return [{"title": f"{service.model_name} [{short}]" if short else service.model_name,
                 "model_name": service.model_name, "hash": short or None,
                 "sha256": service.fingerprint.get("model_weights"), "filename": service.settings.model,
                 "config": None}]  # fmt: skip

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def options() -> dict[str, Any]:
        """The options clients read (the model in use); this server has no others to set."""
        return {"sd_model_checkpoint": service.model_name, "samples_format": "png"}

    @app.post("/sdapi/v1/png-info", tags=["sdapi"], openapi_extra=_body_schema(("image",)))
    async def png_info(request: Request) -> dict[str, Any]:
        """The settings stored in a PNG (``image``: base64): ``info`` (the parameters text), ``items`` (other
        text chunks), ``parameters`` (the API fields read from them)."""
        body = await _json(request)
        return await run_in_threadpool(service.png_info, body)

    # ------------------------------------------------------------------------------------ native job API
    @app.get("/api/info", tags=["jobs"])
    async def info() -> dict[str, Any]:
        return {**service.describe(), "version": __version__}

    @app.post("/api/jobs", tags=["jobs"], status_code=202, openapi_extra=_body_schema((*IMG2IMG_FIELDS, "mode")))
    async def submit(request: Request) -> dict[str, Any]:
        """Queue a job and answer at once with its id (429 when the queue is full). The body takes the
        community API's fields, plus ``mode``: txt2img (default) or img2img."""
        body = await _json(request)
        mode = body.pop("mode", "txt2img") if isinstance(body, dict) else "txt2img"
        if mode not in ("txt2img", "img2img"):
            raise ConfigError(f"field 'mode' must be txt2img or img2img, got {str(mode)[:40]!r}")
        job = await run_in_threadpool(service.submit, body, mode)
        return service.summary(job)

    @app.get("/api/jobs", tags=["jobs"])
    async def jobs() -> dict[str, Any]:
        _, known = service.queue.snapshot()
        return {"jobs": [service.summary(j) for j in known]}

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def job(job_id: str) -> dict[str, Any]:
        return service.summary(service.queue.get(job_id))

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel(job_id: str) -> dict[str, Any]:
        """Cancel a queued job at once or a running one at the sampler's next step (409 once finished)."""
        found = service.queue.get(job_id)
        if found.state in FINISHED:
            raise Conflict(f"job {job_id} is already {found.state}")
        return service.summary(service.queue.cancel(job_id))

    @app.get("/api/jobs/{job_id}/images/{index}", tags=["jobs"])
    async def image(job_id: str, index: int) -> Response:
        found = service.queue.get(job_id)
        data = await run_in_threadpool(service.image_bytes, found, index)
        name = found.images[index].path.name  # image_bytes checked the index
        return Response(data, media_type="image/png", headers={"Content-Disposition": f'inline; filename="{name}"'})

    @app.get("/api/jobs/{job_id}/preview", tags=["jobs"])
    async def preview(job_id: str) -> Response:
        data = service.queue.get(job_id).preview
        if data is None:
            raise NotFound(f"job {job_id} has no preview now")
        return Response(data, media_type="image/png", headers=_NO_STORE)

    @app.get("/api/events", tags=["jobs"])
    async def events(request: Request) -> StreamingResponse:
        """Server-sent events: one ``job`` event (the job's JSON) per change, all known jobs first."""
        return StreamingResponse(_event_stream(service, request), media_type="text/event-stream",
                                 headers={**_NO_STORE, "X-Accel-Buffering": "no"})  # fmt: skip

    return Guard(app, token=token, max_body_bytes=service.settings.max_body_bytes, allowed_origins=allowed_origins)


_NO_STORE = {"Cache-Control": "no-store"}


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the request body is not valid JSON ({str(e)[:120]})") from None


async def _run_sync(service: Service, body: Any, mode: str) -> dict[str, Any]:
    """Queue the job like any other and answer when it has finished (the community API waits)."""
    job: Job = await run_in_threadpool(service.submit, body, mode)
    while not job.done.is_set():
        await asyncio.sleep(0.05)
    if job.state == "failed":
        raise GenerationFailed(job.error or "the job failed")
    return await run_in_threadpool(service.community_result, job)


class GenerationFailed(DiffusekitError):
    """The job failed while it ran (HTTP 500)."""


async def _event_stream(service: Service, request: Request) -> AsyncIterator[str]:
    seen, last = 0, time.monotonic()
    yield "retry: 1000\n\n"
    while not service.queue.closed:
        version, changed = service.queue.snapshot(seen)
        if changed:
            seen = version
            for job in changed:
                yield f"event: job\ndata: {json.dumps(service.summary(job), allow_nan=False)}\n\n"
            last = time.monotonic()
        elif time.monotonic() - last > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last = time.monotonic()
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)


def _body_schema(fields: Iterable[str]) -> dict[str, Any]:
    """The request body as the OpenAPI page shows it (the routes read the JSON themselves, so that the
    recipe validates it and messages name the field)."""
    kinds = {"seed": "integer", "steps": "integer", "width": "integer", "height": "integer", "batch_size": "integer",
             "n_iter": "integer", "cfg_scale": "number", "denoising_strength": "number", "eta": "number",
             "send_images": "boolean", "save_images": "boolean", "init_images": "array",
             "guidance_interval": "array"}  # fmt: skip
    props = {f: {"type": kinds.get(f, "string")} for f in fields}
    if "guidance_interval" in props:
        props["guidance_interval"].update(items={"type": ["number", "null"]}, minItems=2, maxItems=2,
                                          description="[lo, hi]: guidance only at noise levels lo < sigma <= hi "
                                          "(Kynkäänniemi et al. 2024); hi null: no upper end. Default: every "
                                          "step")  # fmt: skip
    if "init_images" in props:
        props["init_images"]["items"] = {"type": "string", "description": "base64 PNG or JPEG"}
    schema = {"type": "object", "properties": props, "additionalProperties": True}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


__all__ = ["create_app"]
