"""One loaded pipeline, one generation at a time, a bounded queue in front of it.

Why a single worker thread: a process holds one model on its device and the engine runs one batch at a time (like
SD.Next's queue lock); more throughput comes from more replicas (serving.ray_serve), not from threads fighting over
one GPU. The HTTP side never blocks on the engine: it submits a `Job` and awaits its future.

Stopping a job: every sampling step asks `Job.should_stop`, which is true once the job was interrupted
(POST /sdapi/v1/interrupt), its client went away, the server is shutting down, or its deadline passed — so a
request stops at the next step, never mid-step. A queued job that is stopped never starts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from cascade.errors import CascadeError, GenerationInterrupted

from .catalog import Catalog, ModelEntry
from .config import ServeConfig
from .errors import Interrupted, QueueFull, ServeError, TimedOut, message_for, status_for
from .metrics import Metrics

log = logging.getLogger(__name__)

INTERRUPT, DISCONNECT, TIMEOUT, SHUTDOWN = "interrupt", "disconnect", "timeout", "shutdown"
RECENT_JOBS = 64  # finished jobs kept for GET /progress?id_task=


def new_task_id() -> str:
    return f"task({uuid.uuid4().hex[:16]})"


@dataclass
class Job:
    """One API request: `requests` run one after another (SD.Next's n_iter batches)."""

    requests: list  # cascade.request.GenerationRequest, one per batch
    model: ModelEntry
    kind: str = "txt2img"
    send_images: bool = True
    timeout_s: float = 600.0
    id: str = field(default_factory=new_task_id)
    created: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: str = "queued"  # queued | running | done | failed
    stop_reason: str | None = None
    started: float | None = None
    batch_no: int = 0
    stage: str | None = None
    step: int = 0
    total: int = 0
    last_event: Any = None  # the latest cascade.pipeline.StepEvent (for the progress preview)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    def should_stop(self) -> bool:
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = TIMEOUT
        return self.stop_reason is not None

    def stage_steps(self, request) -> tuple[int, int]:
        return max(1, request.prior.steps), max(1, request.decoder.steps)

    def progress(self) -> float:
        """0..1 over all batches, each batch weighted by its prior and decoder steps."""
        if self.state in ("done", "failed"):
            return 1.0
        if self.state == "queued" or not self.requests:
            return 0.0
        p, d = self.stage_steps(self.requests[min(self.batch_no, len(self.requests) - 1)])
        frac = 0.0
        if self.stage == "prior" and self.total:
            frac = p / (p + d) * self.step / self.total
        elif self.stage == "decoder" and self.total:
            frac = (p + d * self.step / self.total) / (p + d)
        return min(1.0, (self.batch_no + frac) / len(self.requests))

    def sdnext_state(self) -> dict[str, Any]:
        """SD.Next's `shared.state.dict()` for this job (modules/shared_state.py)."""
        request = self.requests[min(self.batch_no, len(self.requests) - 1)] if self.requests else None
        p, d = self.stage_steps(request) if request is not None else (0, 0)
        step = self.step + (p if self.stage == "decoder" else 0)
        return {"skipped": False, "interrupted": self.stop_reason == INTERRUPT, "job": self.kind,
                "job_count": len(self.requests), "job_timestamp": self.timestamp, "job_no": self.batch_no,
                "sampling_step": step, "sampling_steps": p + d}


@dataclass
class Output:
    """What a finished job produced, already encoded (PNG base64 with infotext) on the worker thread."""

    images: list[str]
    infotexts: list[str]
    seeds: list[int]
    requests: list  # the requests that ran (seeds resolved)
    model: str
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Worker:
    """Owns the session (the loaded pipeline) and runs jobs from the bounded queue on one thread."""

    def __init__(self, config: ServeConfig, catalog: Catalog | None = None, metrics: Metrics | None = None,
                 render: Callable[..., Output] | None = None, session=None):
        """`session`: an already open pipeline of the default model (tests and benchmarks share one)."""
        from . import render as render_module

        self.config = config
        self.catalog = catalog or Catalog(config)
        self.metrics = metrics or Metrics()
        self.render = render or render_module.render_output
        self.session = None
        self.entry: ModelEntry | None = None
        self.names: dict[str, str] = {}
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.running: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._job_seconds = 0.0  # moving average, for Retry-After
        if session is not None:
            self.session, self.entry, self.names = session, self.catalog.default, session.model_names()

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> "Worker":
        """Load the default model (errors surface here, before the server listens) and start the thread."""
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        self._ensure_model(self.catalog.default)
        self._thread = threading.Thread(target=self._loop, name="cascade-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job at its next step, fail the queued ones (503), end the thread."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            if self.running is not None:
                self.running.stop_reason = SHUTDOWN
            self._cond.notify_all()
        for job in pending:
            self._fail(job, ServeError("the server is shutting down; retry on another replica", 503))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.session is not None

    # --- queue --------------------------------------------------------------------------------------------------
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def retry_after(self) -> int:
        average = self._job_seconds or 1.0
        return max(1, int(average * (self.queued() + 1) + 0.999))

    def submit(self, job: Job) -> Job:
        """Queue `job`; QueueFull (503 + Retry-After) when `queue_size` jobs already wait behind a running one."""
        with self._cond:
            if self._stopping:
                raise ServeError("the server is shutting down", 503)
            busy = self.running is not None or bool(self._queue)
            if busy and len(self._queue) >= self.config.queue_size:
                self.metrics.rejected.inc()
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(job)
            self._remember(job)
            self.metrics.queue_length.set(len(self._queue))
            self._cond.notify_all()
        return job

    def find(self, task_id: str | None) -> Job | None:
        """The job with that id (queued, running or recently finished); None: the running one."""
        with self._cond:
            if task_id is None:
                return self.running
            return self._recent.get(task_id)

    def jobs(self) -> list[Job]:
        """The queued, running and recently finished jobs."""
        with self._cond:
            return list(self._recent.values())

    def stop_job(self, task_id: str | None, reason: str = INTERRUPT) -> Job | None:
        """Stop one job: by id, or the running one (SD.Next's interrupt). A queued job is dropped at once."""
        with self._cond:
            job = self.running if task_id is None else self._recent.get(task_id)
            if job is None or job.state in ("done", "failed"):
                return job
            if job.stop_reason is None:
                job.stop_reason = reason
            queued = job.state == "queued" and job in self._queue
            if queued:
                self._queue.remove(job)
                self.metrics.queue_length.set(len(self._queue))
        if queued:
            self._fail(job, self._stopped_error(job, "before it started"))
        return job

    def _remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > RECENT_JOBS:
            oldest = next(iter(self._recent))
            if self._recent[oldest].state in ("queued", "running"):
                break
            self._recent.pop(oldest)

    # --- running ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.metrics.queue_length.set(len(self._queue))
                if job.should_stop():
                    stopped = job
                else:
                    stopped = None
                    job.state, job.started = "running", time.monotonic()
                    self.running = job
            if stopped is not None:
                self._fail(stopped, self._stopped_error(stopped, "while it waited in the queue"))
                continue
            try:
                output = self._run(job)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the waiting request
                self._fail(job, self._as_serve_error(job, exc))
            else:
                job.state = "done"
                self.metrics.images.inc(len(output.seeds))
                job.future.set_result(output)
            finally:
                seconds = time.monotonic() - (job.started or time.monotonic())
                self._job_seconds = seconds if not self._job_seconds else 0.8 * self._job_seconds + 0.2 * seconds
                self.metrics.job_seconds.observe(seconds)
                with self._cond:
                    self.running = None

    def _fail(self, job: Job, error: ServeError) -> None:
        job.state = "failed"
        self.metrics.errors.labels(status=str(error.status)).inc()
        if not job.future.done():
            job.future.set_exception(error)

    def _stopped_error(self, job: Job, when: str) -> ServeError:
        reason = job.stop_reason
        if reason == TIMEOUT:
            return TimedOut(f"the request ran past its {job.timeout_s:g} s timeout and was stopped {when}")
        if reason == DISCONNECT:
            return ServeError(f"the client went away; the request was cancelled {when}", 499, error="ClientClosed")
        if reason == SHUTDOWN:
            return ServeError(f"the server is shutting down; the request was stopped {when}", 503)
        return Interrupted(f"interrupted by POST /sdapi/v1/interrupt {when}; no image was finished")

    def _as_serve_error(self, job: Job, exc: BaseException) -> ServeError:
        if isinstance(exc, ServeError):
            return exc
        if isinstance(exc, GenerationInterrupted):
            return self._stopped_error(job, f"({exc})")
        status = status_for(exc)
        if not isinstance(exc, CascadeError):
            log.exception("generation failed")
        return ServeError(message_for(exc), status, error=type(exc).__name__)

    def _ensure_model(self, entry: ModelEntry) -> None:
        """Open `entry`'s pipeline unless it is the loaded one (the previous one is released first)."""
        if self.entry == entry and self.session is not None:
            return
        from cascade.session import open_pipeline

        self.session, self.entry = None, None
        gc.collect()
        t0 = time.monotonic()
        session = open_pipeline(entry.spec(self.config))
        self.metrics.load_seconds.observe(time.monotonic() - t0)
        self.session, self.entry = session, entry
        self.names = session.model_names()
        for note in session.notes:
            log.info("note: %s", note)

    def _run(self, job: Job) -> Output:
        self._ensure_model(job.model)
        pipe = self.session.pipeline
        last = [time.monotonic()]

        def on_step(event) -> None:
            now = time.monotonic()
            self.metrics.step_seconds.labels(stage=event.stage).observe(now - last[0])
            last[0] = now
            job.stage, job.step, job.total, job.last_event = event.stage, event.step, event.total, event

        results, interrupted = [], False
        t0 = time.monotonic()
        for k, request in enumerate(job.requests):
            job.batch_no, job.stage, job.step, job.total = k, None, 0, 0
            last[0] = time.monotonic()
            try:
                results.append(pipe.generate(request, callback=on_step, interrupt=job.should_stop))
            except GenerationInterrupted:
                if job.stop_reason == INTERRUPT and results:
                    interrupted = True  # SD.Next returns what finished; with none it is an error, never a 200
                    break
                raise
        return self.render(results, self.names, self.entry.name, interrupted=interrupted,
                           send_images=job.send_images, seconds=time.monotonic() - t0)
