"""The one thread that runs the model: it takes jobs from the queue in order, generates their images with the
recipe's :func:`~diffusekit.pipelines.recipe.generate`, writes each PNG (with the recipe's metadata) as soon
as its batch is done, and reports progress, previews and cancellation through the sampler's callback."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffusekit.errors import DiffusekitError
from diffusekit.io.fingerprint import file_sha256
from diffusekit.io.images import to_pil
from diffusekit.io.png import PngWriter
from diffusekit.pipelines.common import to_unit_range
from diffusekit.pipelines.recipe import Recipe, Resolved, generate, parameters_text, png_text, to_metadata
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.samplers.common import StepInfo
from diffusekit.serve.community import Request, api_settings
from diffusekit.serve.images import png_bytes
from diffusekit.serve.jobs import Cancelled, ImageRecord, Job, JobQueue

# provenance keys that tie a PNG to its job, so that a restarted server lists the job again
JOB_KEYS = ("job", "job_number", "job_image", "job_images", "job_created", "job_parameters")


class Work:
    """What the worker needs to run a job: the parsed request and the recipe made concrete for the model."""

    def __init__(self, request: Request, resolved: Resolved) -> None:
        self.request = request
        self.resolved = resolved


class Worker(threading.Thread):
    """Runs the queue's jobs one at a time on ``sd``; ``preview_every`` seconds between previews of the
    running job's clean-image estimate (None: no previews)."""

    def __init__(
        self,
        sd: StableDiffusion,
        queue: JobQueue,
        writer: PngWriter,
        provenance: Mapping[str, Any],
        preview_every: float | None,
    ) -> None:
        super().__init__(name="diffusekit-worker", daemon=True)
        self.sd, self.queue, self.writer = sd, queue, writer
        self.provenance = dict(provenance)
        self.preview_every = preview_every

    def run(self) -> None:
        while (job := self.queue.take()) is not None:
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        work: Work = job.work
        request, resolved = work.request, work.resolved
        provenance = {**self.provenance, "batch_size": request.batch_size, **_input_hashes(request.recipes[0]),
                      "job": job.id, "job_number": job.number, "job_images": job.total_images,
                      "job_created": job.created, "job_parameters": job.parameters}  # fmt: skip
        callback = self._callback(job)
        try:
            for start in range(0, len(request.recipes), request.batch_size):
                batch = request.recipes[start : start + request.batch_size]
                images = generate(self.sd, batch, resolved, callback=callback)
                for k, (recipe, image) in enumerate(zip(batch, images)):
                    meta = to_metadata(recipe, width=resolved.width, height=resolved.height,
                                       sampler=resolved.sampler, karras=resolved.karras,
                                       provenance={**provenance, "job_image": start + k})  # fmt: skip
                    path = self.writer.write(image, recipe.seed, png_text(meta))
                    record = image_record(path, meta)
                    self.queue.update(job, lambda j, r=record: j.images.append(r))
            self.queue.finish(job, "done")
        except Cancelled:
            why = "interrupted" if job.interrupted else "cancelled"
            self.queue.finish(job, "cancelled", f"{why} after {len(job.images)} of {job.total_images} images")
        except DiffusekitError as e:
            self.queue.finish(job, "failed", str(e))
        except Exception as e:  # noqa: BLE001 - one bad job (out of memory, a bug) must not stop the server
            traceback.print_exc(file=sys.stderr)
            self.queue.finish(job, "failed", f"internal error ({type(e).__name__}: {str(e)[:300]})")
        finally:
            job.work = None  # the inputs and tensors of a finished job are not kept

    def _callback(self, job: Job):  # noqa: ANN202 - a StepInfo callback
        last_preview = [0.0]

        def on_step(info: StepInfo) -> None:
            if job.cancel_requested:
                raise Cancelled()
            preview = None
            now = time.monotonic()
            if self.preview_every is not None and now - last_preview[0] >= self.preview_every:
                preview = self._preview(info)
                last_preview[0] = time.monotonic()

            def advance(j: Job) -> None:
                j.step += 1
                if preview is not None:
                    j.preview, j.preview_version = preview, j.preview_version + 1

            self.queue.update(job, advance)

        return on_step

    def _preview(self, info: StepInfo) -> bytes:
        """The first image's clean-data estimate x0_hat at this step, decoded to a PNG (the noisy sample where
        the sampler has no estimate)."""
        x0 = info.x0 if info.x0 is not None else info.x
        with torch.inference_mode():
            pixels = to_unit_range(self.sd.codec.decode(x0[:1].float()).float())
        return png_bytes(to_pil(pixels)[0])


def _input_hashes(recipe: Recipe) -> dict[str, str]:
    return {f"{f}_sha256": file_sha256(getattr(recipe, f)) for f in ("image", "mask") if getattr(recipe, f)}


def image_record(path: Path, meta: Mapping[str, Any]) -> ImageRecord:
    """What the server keeps of a written PNG: its path, seed, infotext and the API fields that remake it."""
    return ImageRecord(path, int(meta["seed"]), parameters_text(meta), api_settings(meta))


__all__ = ["JOB_KEYS", "Work", "Worker", "image_record"]
