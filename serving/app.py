"""The FastAPI app: the subset of SD.Next's API that scripts and clients use, on one `Worker`.

Routes (SD.Next's paths, field names and JSON shapes; modules/api/api.py):
    POST /sdapi/v1/txt2img, /sdapi/v1/img2img   {images: [base64 PNG with infotext], parameters, info}
    GET  /sdapi/v1/progress[?id_task=]          {id, progress, eta_relative, state, current_image, textinfo}
    POST /sdapi/v1/interrupt[?id_task=]         204; the named request, else the running one (SD.Next's rule)
    GET  /sdapi/v1/sd-models, /sdapi/v1/samplers, GET/POST /sdapi/v1/options
    GET  /healthz (never behind auth: load balancers probe it), GET /metrics (Prometheus text)
Errors answer SD.Next's error JSON with the status of serving.errors (400/401/404/409/413/422/499/503/504/507/500).
A generation request whose client disconnects is stopped at its next step; each has a deadline (`timeout_s`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import socket
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cascade.errors import CascadeError, InvalidRequestError

from .config import ServeConfig
from .errors import ServeError, error_body, message_for, status_for
from cascade.images import decode_base64_image as decode_image

from .render import sdnext_info
from .worker import DISCONNECT, RECENT_JOBS, TIMEOUT, Job, Worker

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting request checks its client and its deadline (its answer comes at once)
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- request limits and auth --------------------------------------------------------------------------------------
class BodyTooLarge(ServeError):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than {limit} bytes (--max-body-mb)", 413)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length and while streaming (chunked bodies)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, BodyTooLarge(self.limit))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, error: ServeError) -> None:
    body = json.dumps(error_body(error.status, str(error), error.error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_auth(config: ServeConfig):
    """A dependency: HTTP Basic with one of --api-auth's user:password pairs, or "Bearer <--api-token>"."""
    users = dict(config.api_auth)
    tokens = tuple(config.api_tokens)

    def check(request: Request) -> None:
        if not users and not tokens:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic" and users:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            expected = users.get(user)
            if expected is not None and hmac.compare_digest(password.encode(), expected.encode()):
                return
        if scheme.lower() == "bearer" and any(hmac.compare_digest(value.encode(), t.encode()) for t in tokens):
            return
        raise ServeError("authentication required: HTTP Basic with a user of --api-auth, or a Bearer --api-token",
                         401, {"WWW-Authenticate": 'Basic realm="cascade"'}, error="HTTPException")

    return check


# --- request -> job -----------------------------------------------------------------------------------------------
def prepare_job(body: Any, kind: str, worker: Worker, defaults: dict[str, Any]) -> tuple[Job, Any]:
    """Map, limit and validate a body; every problem is an InvalidRequestError (400) before the job is queued."""
    from cascade.api_fields import from_sdnext
    from cascade.request import build_request

    config = worker.config
    api = from_sdnext(body, img2img=kind == "img2img", defaults=defaults)
    if api.images > config.max_images:
        raise InvalidRequestError(f"{api.images} images (batch_size x n_iter) in one request; this server makes at "
                                  f"most {config.max_images}")
    fields = dict(api.fields)
    for key in ("prompt", "negative_prompt"):
        text = fields.get(key)
        if isinstance(text, str) and len(text) > config.max_prompt_chars:
            raise InvalidRequestError(f"{key} has {len(text)} characters; this server takes at most "
                                      f"{config.max_prompt_chars} (--max-prompt-chars)")
    for key in ("width", "height"):
        if isinstance(fields.get(key), bool) or not isinstance(fields.get(key, 1024), (int, float)):
            raise InvalidRequestError(f"{key} {fields.get(key)!r} must be a whole number of pixels")
    width, height = fields.get("width", 1024), fields.get("height", 1024)
    if width * height > config.max_image_pixels:
        raise InvalidRequestError(f"{width}x{height} is more than this server's {config.max_image_pixels} pixels per "
                                  "image (--max-image-pixels)")
    if api.init_images:
        fields["image"] = decode_image(api.init_images[0], config.max_image_pixels, config.max_body_bytes)
    if api.controlnets:
        fields["controlnets"] = worker.catalog.controlnets(api.controlnets, api.controlnets_key,
                                                           config.max_image_pixels, config.max_body_bytes)
    model = worker.catalog.find(api.model or defaults.get("__model__"))
    requests = [build_request({**fields, "seed": api.iteration(k)["seed"]}) for k in range(api.n_iter)]
    job = Job(requests, model, kind, api.send_images, config.timeout_s)
    if api.task_id:
        job.id = api.task_id
    return job, api


def echo_parameters(body: Any) -> dict[str, Any]:
    """SD.Next echoes the request back as `parameters`; images and long strings are elided as SD.Next does."""
    if not isinstance(body, dict):
        return {}
    out = {}
    for key, value in body.items():
        if key in ("init_images", "mask"):
            continue
        out[key] = _elided(value)
    return out


def _elided(value: Any) -> Any:
    """Long strings (the base64 images of ControlNet items too) as `<str N>`, at any depth."""
    if isinstance(value, str) and len(value) >= 1000:
        return f"<str {len(value)}>"
    if isinstance(value, dict):
        return {k: _elided(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_elided(v) for v in value]
    return value


# --- the app ------------------------------------------------------------------------------------------------------
def create_app(config: ServeConfig, worker: Worker | None = None, *, start: bool = True, tasks=None) -> FastAPI:
    """The app for one worker (a new, started one unless given). Closing the app stops the worker.

    `tasks`: where replicas share their tasks (serving.ray_serve.SharedTasks), so /progress and /interrupt by id
    work on whichever replica the proxy picks; None for a standalone server."""
    from contextlib import asynccontextmanager

    from cascade.api_fields import MODEL_OPTION, from_sdnext, option_key, options_to_fields

    worker = worker or Worker(config)
    if start and worker._thread is None:
        worker.start()
    metrics = worker.metrics
    wid = worker_id()
    defaults: dict[str, Any] = {}  # POST /sdapi/v1/options: flat fields below every request's own, and __model__

    @asynccontextmanager
    async def lifespan(app):
        sharing = asyncio.create_task(share_tasks(worker, tasks)) if tasks is not None else None
        yield
        if sharing is not None:
            sharing.cancel()
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="Stable Cascade (SD.Next API subset)", lifespan=lifespan)
    app.state.worker = worker
    auth = Depends(make_auth(config))

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, exc: ServeError):
        return JSONResponse(error_body(exc.status, str(exc), exc.error), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(CascadeError)
    async def on_cascade_error(request: Request, exc: CascadeError):
        status = status_for(exc)
        return JSONResponse(error_body(status, message_for(exc), type(exc).__name__), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail), "HTTPException"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(422, str(exc.errors()), "RequestValidationError"), status_code=422)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(500, message_for(exc), type(exc).__name__), status_code=500)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidRequestError(f"the request body is not valid JSON ({err})") from None
        except RecursionError:
            raise InvalidRequestError("the request body nests JSON arrays/objects too deeply") from None

    async def wait_for(job: Job, request: Request):
        """The job's output; stops the job when the client goes away or its deadline passes while it waits."""
        done = asyncio.wrap_future(job.future)  # resolved from the worker thread: no polling delay on the answer
        try:
            while not job.future.done():
                await asyncio.wait({done}, timeout=POLL_S)
                if job.future.done():
                    break
                if await request.is_disconnected():
                    worker.stop_job(job.id, DISCONNECT)
                    raise ServeError("the client went away; the request was cancelled", 499, error="ClientClosed")
                if job.state == "queued" and time.monotonic() > job.deadline:
                    worker.stop_job(job.id, TIMEOUT)
        except asyncio.CancelledError:  # the server (or Ray's proxy) cancelled the request: the client is gone
            worker.stop_job(job.id, DISCONNECT)
            raise
        finally:
            if not done.done():  # left early: the job's later error is nobody's to read, not "never retrieved"
                done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await done

    async def generate(request: Request, kind: str) -> JSONResponse:
        endpoint = f"/sdapi/v1/{kind}"
        t0 = time.monotonic()
        status = 500
        try:
            body = await read_json(request)
            job, api = await run_in_threadpool(prepare_job, body, kind, worker, defaults)
            worker.submit(job)
            output = await wait_for(job, request)
            status = 200
            info = sdnext_info(output, job.id, ignored=api.ignored, worker=wid)
            return JSONResponse({"images": output.images, "parameters": echo_parameters(body), "info": info},
                                headers={"X-Task-Id": job.id, "X-Cascade-Worker": wid})
        except ServeError as err:
            status = err.status
            raise
        except CascadeError as err:
            status = status_for(err)
            raise
        finally:
            metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.monotonic() - t0)

    @app.post("/sdapi/v1/txt2img", dependencies=[auth])
    async def txt2img(request: Request):
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img", dependencies=[auth])
    async def img2img(request: Request):
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/progress", dependencies=[auth])
    async def progress(id_task: str | None = None, skip_current_image: bool = False):
        job = worker.find(id_task)
        if id_task is not None and job is None and tasks is not None:
            shared = await tasks.progress(id_task)  # running on another replica
            if shared is not None:
                return shared
        if id_task is not None and job is None:
            raise ServeError(f"no task {id_task!r} (finished tasks are kept for a while only)", 404)
        if job is None:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                     "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": worker.queued()}
            return {"id": None, "progress": 0, "eta_relative": 0, "state": state, "current_image": None,
                    "textinfo": None}
        event = job.last_event
        image = None
        if event is not None and not skip_current_image and job.state == "running":
            image = await run_in_threadpool(_preview_b64, event)
        return progress_payload(job, worker.queued(), image)

    @app.post("/sdapi/v1/interrupt", dependencies=[auth], status_code=204)
    async def interrupt(request: Request, id_task: str | None = None):
        if id_task is None:
            body = await read_json(request)
            id_task = body.get("id_task") if isinstance(body, dict) else None
        if id_task is not None and not isinstance(id_task, str):
            raise InvalidRequestError("id_task must be a string (the task id of a request)")
        job = worker.stop_job(id_task)
        if id_task is not None and job is None and not (tasks is not None and await tasks.interrupt(id_task)):
            raise ServeError(f"no task {id_task!r} to interrupt", 404)
        return Response(status_code=204)

    @app.get("/sdapi/v1/sd-models", dependencies=[auth])
    async def sd_models():
        entries = await run_in_threadpool(worker.catalog.entries)
        return [e.as_sdnext(worker.catalog.root) for e in entries]

    @app.get("/sdapi/v1/samplers", dependencies=[auth])
    async def samplers():
        from cascade.names import SAMPLERS

        return [{"name": "Default", "aliases": ["default"], "options": {}}] + [
            {"name": title, "aliases": [name, *aliases], "options": {}} for name, (title, aliases) in SAMPLERS.items()]

    @app.get("/sdapi/v1/options", dependencies=[auth])
    async def get_options():
        from cascade.request import build_request, request_fields

        current = request_fields(build_request({"prompt": "", **{k: v for k, v in defaults.items() if k != "__model__"}}))
        settings = ("prior_scheduler", "prior_shift", "decoder_sampler", "decoder_scheduler", "decoder_shift",
                    "compression", "stage_a_scale")
        model = defaults.get("__model__") or (worker.entry.name if worker.entry else worker.catalog.default.name)
        return {MODEL_OPTION: model, **{option_key(k): current[k] for k in settings}}

    @app.post("/sdapi/v1/options", dependencies=[auth])
    async def set_options(request: Request):
        from cascade.request import build_request

        body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequestError("options must be a JSON object")
        new = {**defaults, **options_to_fields(body, "options")}
        if body.get(MODEL_OPTION):
            new["__model__"] = (await run_in_threadpool(worker.catalog.find, body[MODEL_OPTION])).name
        build_request({"prompt": "", **{k: v for k, v in new.items() if k != "__model__"}})  # refuse values no request could use
        defaults.clear()
        defaults.update(new)
        applied = [k for k in body if k == MODEL_OPTION or k.startswith("cascade_")]
        return {"updated": [{k: True} for k in applied], "ignored": sorted(k for k in body if k not in applied)}

    @app.get("/healthz")
    async def healthz():
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": worker.entry.name if worker.entry else None,
                "queued": worker.queued(), "running": worker.running.id if worker.running else None, "worker": wid,
                "tags": dict(config.tags)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[auth])
    async def metrics_text():
        metrics.queue_length.set(worker.queued())
        metrics.running.set(1 if worker.running else 0)
        payload, content_type = metrics.text()
        return Response(payload, media_type=content_type)

    _ = from_sdnext  # the mapping used by prepare_job (imported here so a missing cascade module fails at start)
    return _wrap(app, config)


def progress_payload(job: Job, queued: int, image: str | None = None) -> dict[str, Any]:
    """SD.Next's /progress answer for one job (modules/api/models.py ProgressResponse)."""
    fraction = job.progress()
    elapsed = time.monotonic() - (job.started or time.monotonic())
    eta = elapsed / fraction - elapsed if 0 < fraction < 1 else 0
    stage = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)"}.get(job.stage or "", "")
    textinfo = f"Stable Cascade {stage}: step {job.step}/{job.total}" if stage else job.state
    state = {**job.sdnext_state(), "queued": queued, "status": job.state}
    return {"id": job.id, "progress": round(fraction, 4), "eta_relative": round(eta, 2), "state": state,
            "current_image": image, "textinfo": textinfo}


SHARE_S = 0.25  # how often a replica publishes its tasks' progress and picks up interrupts meant for it


async def share_tasks(worker: Worker, tasks) -> None:
    """Publish the progress of this worker's live tasks (and each finished one once) and stop the tasks another
    replica was asked to interrupt. A failure of the shared store only costs cross-replica progress, so it is
    logged and retried."""
    final: set[str] = set()
    while True:
        await asyncio.sleep(SHARE_S)
        try:
            jobs = [j for j in worker.jobs() if j.id not in final]
            final.update(j.id for j in jobs if j.state in ("done", "failed"))
            if jobs:
                await tasks.publish({j.id: progress_payload(j, worker.queued()) for j in jobs})
            for task_id in await tasks.take_stops():
                worker.stop_job(task_id)
            if len(final) > 4 * RECENT_JOBS:
                final = {j.id for j in worker.jobs()} & final
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the store is an optimisation, generation goes on without it
            log.warning("sharing tasks with the other replicas failed", exc_info=True)


def _wrap(app: FastAPI, config: ServeConfig) -> FastAPI:
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    return app


def _preview_b64(event) -> str:
    """The step's estimate as a small PNG (ComfyUI's latent-to-RGB factors: cheap, no model needed)."""
    from cascade.previews import preview_image

    buffer = io.BytesIO()
    preview_image(event.latents, event.stage, None, "rgb").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
