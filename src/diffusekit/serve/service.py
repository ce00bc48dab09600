"""What the routes call: the loaded model, the queue, the worker and the output folder, with the requests'
translation into jobs and the jobs' into the API's answers. No HTTP here (the routes are in ``app``)."""

from __future__ import annotations

import base64
import json
import math
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.fingerprint import model_fingerprint
from diffusekit.io.png import PngWriter
from diffusekit.pipelines.denoise import grid_for, sampler_for
from diffusekit.pipelines.recipe import (
    METADATA_KEY,
    PARAMETERS_KEY,
    SIDE_MULTIPLE,
    read_png_metadata,
    recipe_from_metadata,
    recipe_from_parameters,
    resolve,
)
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.serve import community, images
from diffusekit.serve.community import Limits, api_settings, sampler_label
from diffusekit.serve.jobs import Job, JobQueue, NotFound, batches
from diffusekit.serve.worker import JOB_KEYS, Work, Worker, image_record


@dataclass(frozen=True)
class Settings:
    """The server's own settings (the command line's options)."""

    model: str  # absolute path of the model folder or file
    out: Path  # where results (and uploaded input images, under inputs/) are kept
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    limits: Limits = Limits()
    queue_size: int = 64
    max_body_bytes: int = 32 << 20
    preview_every: float | None = 1.0  # seconds between previews; None: none
    engine: str = "torch"  # what runs the U-Net (pipelines.openvino_unet.ENGINES)


class Service:
    """The server's state. ``start()`` restores finished jobs from the output folder and starts the worker."""

    def __init__(self, sd: StableDiffusion, settings: Settings) -> None:
        self.sd, self.settings = sd, settings
        self.queue = JobQueue(settings.queue_size)
        self.writer = PngWriter(settings.out, where=f"--out {settings.out}")
        self.inputs = settings.out / "inputs"
        self.model_name = Path(settings.model).name
        self.fingerprint = model_fingerprint(settings.model, settings.tokenizer)
        provenance = {"device": settings.device, **self.fingerprint}
        if settings.engine != "torch":  # recorded as txt2img records it
            provenance["engine"] = settings.engine
        self.worker = Worker(sd, self.queue, self.writer, provenance, settings.preview_every)

    def start(self) -> Service:
        self.writer.prepare()  # the folder can be written (OutputError naming --out if not)
        self.queue.add_restored(restore_jobs(self.settings.out))
        self.worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.close()
        if self.worker.is_alive():
            self.worker.join(timeout)

    # ------------------------------------------------------------------------------------------ submitting
    def submit(self, body: Any, mode: str) -> Job:
        """A community API body (txt2img or img2img) as a queued job; ConfigError naming the API field,
        QueueFull when the queue is full."""
        s = self.settings
        max_chars = s.max_body_bytes * 4 // 3 + 16

        def store(field: str, value: Any, image_mode: str) -> str:
            return images.store_image(self.inputs, field, value, image_mode, max_chars=max_chars)

        request = community.parse_request(body, mode, model=s.model, tokenizer=s.tokenizer, dtype=s.dtype,
                                          limits=s.limits, store_image=store)  # fmt: skip
        first = request.recipes[0]
        resolved = resolve(first, self.sd, community.api_field)
        if max(resolved.width, resolved.height) > s.limits.max_side:  # an input image's own size
            raise ConfigError(f"field 'init_images' is {resolved.width}x{resolved.height} pixels, larger than "
                              f"{s.limits.max_side} a side on this server (diffusekit serve --max-side); set "
                              "width and height to resize it")  # fmt: skip
        steps = len(grid_for(sampler_for(resolved.sampler_config(self.sd), None, first.eta), first.steps,
                             first.strength or 1.0))  # fmt: skip
        parameters = {**request.parameters, "width": resolved.width, "height": resolved.height}
        if parameters["sampler_name"] is None:
            parameters["sampler_name"] = sampler_label(resolved.sampler, resolved.karras)
        job = Job(id=secrets.token_hex(8), number=-1, mode=request.mode, parameters=parameters,
                  total_images=len(request.recipes), steps_per_batch=steps,
                  batches=batches(len(request.recipes), request.batch_size), ignored=request.ignored,
                  send_images=request.send_images, work=Work(request, resolved))  # fmt: skip
        return self.queue.submit(job)

    # ------------------------------------------------------------------------------------------ answers
    def summary(self, job: Job) -> dict[str, Any]:
        """The native API's view of a job."""
        return {
            "id": job.id, "number": job.number, "version": job.version, "state": job.state, "mode": job.mode,
            "position": self.queue.position(job) if job.state == "queued" else None,
            "created": job.created, "started": job.started, "finished": job.finished,
            "progress": job.progress(), "step": job.step, "steps": job.total_steps, "eta_s": job.eta(),
            "total_images": job.total_images, "error": job.error, "cancel_requested": job.cancel_requested,
            "preview": job.preview_version if job.preview is not None else None, "restored": job.restored,
            "settings": job.parameters, "ignored_fields": job.ignored,
            "images": [{"url": f"/api/jobs/{job.id}/images/{i}", "file": r.path.name, "seed": r.seed,
                        "infotext": r.infotext, "settings": r.settings} for i, r in enumerate(job.images)],
        }  # fmt: skip

    def image_bytes(self, job: Job, index: int) -> bytes:
        if not 0 <= index < len(job.images):
            raise NotFound(f"job {job.id} has {len(job.images)} images; no image {index}")
        try:
            return job.images[index].path.read_bytes()
        except OSError as e:
            raise NotFound(f"image {index} of job {job.id} is no longer on disk ({e.strerror})") from None

    def community_result(self, job: Job) -> dict[str, Any]:
        """The ``/sdapi/v1/txt2img`` and ``img2img`` answer: ``{images, parameters, info}`` with ``info`` a
        JSON string, as the web UI sends it."""
        send = job.send_images
        encoded = [base64.b64encode(self.image_bytes(job, i)).decode("ascii") for i in range(len(job.images))]
        p = job.parameters
        seeds = [r.seed for r in job.images]
        info = {"prompt": p["prompt"], "all_prompts": [p["prompt"]] * len(seeds),
                "negative_prompt": p["negative_prompt"], "all_negative_prompts": [p["negative_prompt"]] * len(seeds),
                "seed": p["seed"], "all_seeds": seeds, "width": p["width"], "height": p["height"],
                "sampler_name": p["sampler_name"], "cfg_scale": p["cfg_scale"], "steps": p["steps"],
                "batch_size": p["batch_size"], "n_iter": p["n_iter"], "denoising_strength": p.get("denoising_strength"),
                "infotexts": [r.infotext for r in job.images], "sd_model_name": self.model_name,
                "job": job.id, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                "files": [r.path.name for r in job.images], "interrupted": job.interrupted,
                "ignored_fields": job.ignored}  # fmt: skip
        return {"images": encoded if send else [], "parameters": p, "info": json.dumps(info, allow_nan=False)}

    def progress(self, skip_current_image: bool = False) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``: the running job's progress, ETA, step and preview."""
        waiting, busy = self.queue.counts()
        job = self.queue.running
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": busy, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        eta = job.eta()
        batch = min(job.batches - 1, job.step // job.steps_per_batch) if job.steps_per_batch else 0
        state.update(interrupted=job.cancel_requested, job=job.id, job_no=batch,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                     sampling_step=job.step - batch * job.steps_per_batch,
                     sampling_steps=job.steps_per_batch)  # fmt: skip
        preview = job.preview
        image = None if skip_current_image or preview is None else base64.b64encode(preview).decode("ascii")
        return {"progress": job.progress(), "eta_relative": eta or 0.0, "state": state, "current_image": image,
                "textinfo": f"{waiting} jobs waiting"}  # fmt: skip

    def interrupt(self) -> Job | None:
        """``POST /sdapi/v1/interrupt``: stop the running job at its sampler's next step."""
        job = self.queue.running
        return self.queue.cancel(job.id, interrupted=True) if job is not None else None

    def png_info(self, body: Any) -> dict[str, Any]:
        """``POST /sdapi/v1/png-info``: ``{info, items, parameters}`` -- the ``parameters`` text, the other text
        chunks, and the API fields read from the diffusekit metadata or else from the ``parameters`` text."""
        if not isinstance(body, Mapping):
            raise ConfigError(f"the request body must be a JSON object, got {type(body).__name__}")
        data = images.decode_base64("image", body.get("image"), max_chars=self.settings.max_body_bytes * 4 // 3 + 16)
        chunks = images.text_chunks("image", data)
        info = chunks.get(PARAMETERS_KEY, "")
        items = {k: v for k, v in chunks.items() if k != PARAMETERS_KEY}
        parameters: dict[str, Any] = {}
        if info:
            try:
                parameters = api_settings(recipe_from_parameters(info, "image").fields)
            except DiffusekitError:
                pass  # text that is not the web UI's form: the text itself is all there is
        if METADATA_KEY in chunks:
            try:
                parameters = {**parameters, **_settings_of_png(data)}
            except DiffusekitError:
                pass  # malformed diffusekit metadata: the readable text is all there is
        return {"info": info, "items": items, "parameters": parameters}

    def describe(self) -> dict[str, Any]:
        """``GET /api/info``: what the page needs to draw its form."""
        cfg = self.sd.sampler_config
        native = (self.sd.unet.config.sample_size or 64) * self.sd.codec.downsample_factor
        return {"model": self.model_name, "sampler": sampler_label(cfg.sampler, cfg.karras_sigmas),
                "samplers": community.samplers_list(), "native_size": native,
                "size_multiple": math.lcm(SIDE_MULTIPLE, self.sd.latent_multiple), "limits": vars(self.settings.limits),
                "queue_size": self.settings.queue_size, "max_body_bytes": self.settings.max_body_bytes}  # fmt: skip


def _settings_of_png(data: bytes) -> dict[str, Any]:
    """The API fields of a diffusekit PNG (its JSON metadata read and validated by the recipe's reader)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".png") as f:  # the reader takes a file; this one is ours
        f.write(data)
        f.flush()
        meta = read_png_metadata(f.name, where="image")
        recipe_from_metadata(meta, "image")  # validated: a hostile file is refused, not echoed
    return api_settings(meta)


def restore_jobs(out: Path) -> list[Job]:
    """Jobs whose images are in ``out`` (from a previous run of the server), rebuilt from the PNGs'
    metadata: done when every image of the job is there, else failed (it stopped part way)."""
    found: dict[str, Job] = {}
    for path in sorted(out.glob("*.png")):
        try:
            meta = read_png_metadata(path, where=str(path))
        except DiffusekitError:
            continue  # not one of ours (or damaged): left alone
        job_id = meta.get("job")
        if not isinstance(job_id, str) or not all(k in meta for k in JOB_KEYS):
            continue  # made by the command line, not by a server job
        try:
            record = image_record(path, meta)
            job = found.get(job_id)
            if job is None:
                job = found[job_id] = Job(id=job_id, number=int(meta["job_number"]), mode=str(meta["mode"]),
                                          parameters=dict(meta["job_parameters"]),
                                          total_images=int(meta["job_images"]), created=float(meta["job_created"]),
                                          state="done", restored=True)  # fmt: skip
            job.images.append(record)
        except (KeyError, TypeError, ValueError) as e:
            print(f"diffusekit serve: warning: {path}: unreadable job metadata ({e})", file=sys.stderr)
    for job in found.values():
        job.finished = job.created
        job.done.set()
        if len(job.images) < job.total_images:
            job.state = "failed"
            job.error = (f"stopped before it finished: {len(job.images)} of {job.total_images} images were made "
                         "(the server stopped or the job was cancelled)")  # fmt: skip
    return list(found.values())


__all__ = ["Service", "Settings", "restore_jobs"]
