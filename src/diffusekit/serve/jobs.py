"""The job queue: first in, first out, bounded, and one worker thread that owns the model.

A job is one request (one recipe per image, run in network batches). States: queued -> running -> done,
failed or cancelled; a queued job is cancelled at once, a running one at the sampler's next step (the
per-step callback raises :class:`Cancelled`). Every change bumps a version counter, which the event stream
and the progress route read. Finished jobs beyond ``keep_finished`` are forgotten (their images stay on
disk, and a restart lists them again).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusekit.errors import DiffusekitError

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


class QueueFull(DiffusekitError):
    """The queue holds its maximum of waiting jobs (HTTP 429)."""


class NotFound(DiffusekitError, LookupError):
    """No such job, image or file (HTTP 404)."""


class UnknownJob(NotFound):
    """No job has this id."""


class Cancelled(Exception):
    """Raised from the sampler's per-step callback to stop a job that was cancelled or interrupted."""


@dataclass
class ImageRecord:
    """One finished image: its file (named by the server) and what the page shows of it."""

    path: Path
    seed: int
    infotext: str  # the PNG's human-readable ``parameters`` chunk
    settings: dict[str, Any]  # the community API's fields that make this image again


@dataclass(eq=False)
class Job:
    """One request in the queue. ``work`` (run by the worker) is None for jobs restored from disk."""

    id: str
    number: int  # position in the order of submission, never reused (FIFO order)
    mode: str
    parameters: dict[str, Any]  # the community API's fields with the values used
    total_images: int
    steps_per_batch: int = 0
    batches: int = 0
    ignored: list[str] = field(default_factory=list)
    send_images: bool = True  # the community API's field: False answers without the images
    work: Any = None
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    step: int = 0  # sampler steps done over the whole job
    images: list[ImageRecord] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    interrupted: bool = False  # stopped by /sdapi/v1/interrupt
    preview: bytes | None = None
    preview_version: int = 0
    version: int = 0
    restored: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def total_steps(self) -> int:
        return self.steps_per_batch * self.batches

    def progress(self) -> float:
        """The fraction of the job's sampler steps done, 0 to 1 (1 once it finished)."""
        if self.state in FINISHED:
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the pace so far; None before the first step."""
        if self.state != "running" or not self.step or self.started is None:
            return None
        elapsed = (now or time.time()) - self.started
        return max(0.0, elapsed / self.step * (self.total_steps - self.step))


class JobQueue:
    """The queue and the index of known jobs; every method is thread-safe."""

    def __init__(self, max_queued: int, keep_finished: int = 1000) -> None:
        self.max_queued = max_queued
        self.keep_finished = keep_finished
        self.cond = threading.Condition()
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # by submission
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.version = 0
        self.closed = False
        self.next_number = 0

    def _touch(self, job: Job) -> None:
        self.version += 1
        job.version = self.version
        self.cond.notify_all()

    def submit(self, job: Job) -> Job:
        """Add ``job`` at the back of the queue; QueueFull if ``max_queued`` jobs wait already."""
        with self.cond:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); retry when one finished "
                                "(diffusekit serve --queue-size sets the length)")  # fmt: skip
            job.number = self.next_number
            self.next_number += 1
            self.waiting.append(job)
            self.jobs[job.id] = job
            self._touch(job)
            self._forget_old()
        return job

    def add_restored(self, jobs: list[Job]) -> None:
        """Jobs found on disk at start-up (finished; listed before any new job)."""
        with self.cond:
            for job in sorted(jobs, key=lambda j: j.number):
                self.jobs[job.id] = job
                self._touch(job)
            self.next_number = max([self.next_number, *(j.number + 1 for j in jobs)])
            self._forget_old()

    def take(self, timeout: float | None = None) -> Job | None:
        """The next queued job, now running (blocks until there is one); None once closed."""
        with self.cond:
            while not self.waiting and not self.closed:
                if not self.cond.wait(timeout):
                    return None
            if self.closed:
                return None
            job = self.waiting.popleft()
            job.state, job.started = "running", time.time()
            self.running = job
            self._touch(job)
            return job

    def update(self, job: Job, change: Callable[[Job], None]) -> None:
        """Apply ``change`` to ``job`` under the lock and announce it."""
        with self.cond:
            change(job)
            self._touch(job)

    def finish(self, job: Job, state: str, error: str | None = None) -> None:
        with self.cond:
            job.state, job.error, job.finished = state, error, time.time()
            job.preview = None  # the images are on disk; previews are for the running job only
            if self.running is job:
                self.running = None
            self._touch(job)
            job.done.set()
            self._forget_old()

    def cancel(self, job_id: str, *, interrupted: bool = False) -> Job:
        """Cancel a queued job at once, a running one at its sampler's next step; a finished job is left as it
        is (the caller reads its state)."""
        with self.cond:
            job = self.get(job_id)
            if job.state == "queued":
                self.waiting.remove(job)
                job.interrupted = interrupted
                job.state, job.finished = "cancelled", time.time()
                job.done.set()
            elif job.state == "running":
                job.cancel_requested, job.interrupted = True, interrupted
            self._touch(job)
            return job

    def get(self, job_id: str) -> Job:
        with self.cond:
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is None:
                raise UnknownJob(f"no job with id {str(job_id)[:80]!r}")
            return job

    def position(self, job: Job) -> int | None:
        """0 for the next job to run, 1 for the one after, ...; None when the job is not waiting."""
        with self.cond:
            try:
                return self.waiting.index(job)
            except ValueError:
                return None

    def snapshot(self, since: int = 0) -> tuple[int, list[Job]]:
        """The current version and the known jobs changed after version ``since``, in submission order."""
        with self.cond:
            return self.version, [j for j in self.jobs.values() if j.version > since]

    def counts(self) -> tuple[int, int]:
        """(jobs waiting, jobs waiting or running)."""
        with self.cond:
            return len(self.waiting), len(self.waiting) + (self.running is not None)

    def close(self) -> None:
        """Stop taking jobs: the worker's next take() returns None; the running job is cancelled."""
        with self.cond:
            self.closed = True
            if self.running is not None:
                self.running.cancel_requested = True
            for job in self.waiting:
                job.state, job.error, job.finished = "cancelled", "the server shut down", time.time()
                job.done.set()
            self.waiting.clear()
            self.cond.notify_all()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self.jobs[job.id]


def batches(total: int, batch_size: int) -> int:
    return math.ceil(total / batch_size)


__all__ = ["FINISHED", "STATES", "Cancelled", "ImageRecord", "Job", "JobQueue", "NotFound", "QueueFull", "UnknownJob",
           "batches"]  # fmt: skip
