"""The HTTP API against a live uvicorn on a free loopback port, the SD.Next field mapping, and batch jobs.

The client side is written against SD.Next's API docs (modules/api/models.py, middleware.py): txt2img bodies with
SD.Next's field names, base64 PNGs with a `parameters` chunk, `info` as a JSON string, progress / interrupt shapes,
the error JSON. One tiny pipeline is loaded once and shared by every server of the module. Every wait is bounded.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.api_fields import from_sdnext
from cascade.errors import CascadeError, InvalidRequestError
from cascade.infotext import parse_infotext

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"width": 128, "height": 128, "steps": 4, "refiner_steps": 2}
LONG = {"prompt": "a long one", "width": 128, "height": 128, "steps": 1000, "refiner_steps": 2, "seed": 1}


# --- the SD.Next field mapping (pure) -----------------------------------------------------------------------------
def test_sdnext_fields_map_to_flat_names_with_sdnext_defaults():
    api = from_sdnext({"prompt": "a cat", "seed": 5})
    assert api.fields["prior_steps"] == 20 and api.fields["decoder_steps"] == 5  # SD.Next's API defaults
    assert api.fields["prior_cfg"] == 6.0 and "decoder_cfg" not in api.fields  # cfg_image unset: engine default
    assert api.fields["width"] == api.fields["height"] == 1024 and api.fields["seed"] == 5
    api = from_sdnext({"prompt": "a", "steps": 7, "cfg_scale": -1, "cfg_image": 1.5, "refiner_steps": 3,
                       "sampler_name": "DPM++ 2M", "scheduler": "Automatic", "n_iter": 2, "batch_size": 3, "seed": 10,
                       "override_settings": {"cascade_compression": 32, "sd_model_checkpoint": "m"},
                       "extra": {"cascade_decoder_shift": 1.5}, "restore_faces": False, "unknown_field": 1})
    f = api.fields
    assert (f["prior_steps"], f["decoder_steps"], f["decoder_cfg"]) == (7, 3, 1.5) and "prior_cfg" not in f
    assert f["prior_sampler"] == "DPM++ 2M" and f["prior_scheduler"] == "Default"
    assert (f["compression"], f["decoder_shift"], api.model) == (32, 1.5, "m")
    assert api.images == 6 and api.iteration(1)["seed"] == 13  # A1111: batch k starts at seed + k * batch_size
    assert api.ignored == ("unknown_field",)


def test_random_seed_is_drawn_once_and_reported():
    api = from_sdnext({"prompt": "a", "seed": -1}, draw_seed=lambda: 1234)
    assert api.fields["seed"] == 1234


@pytest.mark.parametrize("body, words", [
    ({"enable_hr": True}, "enable_hr"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"tiling": 1}, "tiling"),
    ({"steps": 3, "prior_steps": 4}, "both"),
    ({"seed": -7}, "seed"),
    ({"cfg_scale": -3}, "negative"),
    ({"image": "/etc/passwd"}, "init_images"),
    ({"extra": {"cascade_nonsense": 1}}, "not a Stable Cascade option"),
    ({"n_iter": 0}, "n_iter"),
    ({"init_images": ["x"]}, "img2img"),
])
def test_sdnext_fields_refused_with_the_reason(body, words):
    with pytest.raises(InvalidRequestError, match=words):
        from_sdnext({"prompt": "a", **body})


# --- a live server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_deps():
    for name in ("fastapi", "uvicorn", "prometheus_client"):
        pytest.importorskip(name, reason=f"{name} is not installed (python install.py --serve)")


@pytest.fixture(scope="module")
def session(serve_deps):
    import torch

    from cascade.session import PipelineSpec, open_pipeline

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return open_pipeline(PipelineSpec(device="cpu"))


def _start(config, session):
    from serving.app import create_app
    from serving.server import BackgroundServer
    from serving.worker import Worker

    worker = Worker(config, session=session)
    server = BackgroundServer(create_app(config, worker))
    url = server.__enter__()
    return server, url, worker


@pytest.fixture(scope="module")
def live(session):
    """The main server: no auth, queue of 1, default limits."""
    from serving.config import ServeConfig

    server, url, worker = _start(ServeConfig(device="cpu", queue_size=1, timeout_s=120), session)
    yield url, worker
    server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def guarded(session):
    """A second server on the same pipeline: auth on, a 64 KiB body limit, a 2 s timeout, 2 images per request."""
    from serving.config import ServeConfig

    config = ServeConfig(device="cpu", queue_size=2, timeout_s=2.0, api_auth=(("alice", "s3cret"),),
                         api_tokens=("tok123",), max_body_bytes=64 * 1024, max_images=2)
    server, url, worker = _start(config, session)
    yield url, worker
    server.__exit__(None, None, None)


def call(url: str, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60.0):
    """A tiny SD.Next client (stdlib only): returns (status, headers, parsed JSON or raw bytes)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return resp.status, dict(resp.getheaders()), parsed


def txt2img(url: str, body: dict, **kw):
    return call(url, "POST", "/sdapi/v1/txt2img", body, **kw)


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Background:
    """A request on a thread; `.result` is (status, headers, body) once it returned."""

    def __init__(self, url: str, body: dict, path: str = "/sdapi/v1/txt2img"):
        self.result = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", call(url, "POST", path, body, timeout=120)))
        self.thread.start()

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not return in time"
        return self.result


def running_job(worker, timeout: float = 30.0):
    return wait_until(lambda: worker.running if worker.running and worker.running.step > 0 else None, timeout,
                      "a running job")


def test_txt2img_shapes_and_infotext(live):
    url, _ = live
    status, headers, body = txt2img(url, {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7,
                                          "batch_size": 2, "cfg_scale": 5, **SMALL})
    assert status == 200, body
    assert set(body) == {"images", "parameters", "info"}
    assert body["parameters"]["prompt"] == "a red fox" and body["parameters"]["seed"] == 7
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and info["width"] == 128
    assert info["id_task"] == headers["x-task-id"] and len(info["infotexts"]) == 2
    images = [decode_png(b) for b in body["images"]]
    assert [im.size for im in images] == [(128, 128)] * 2 and images[0].format == "PNG"
    params = parse_infotext(images[1].text["parameters"])
    assert params["Prompt"] == "a red fox" and params["Negative prompt"] == "blurry"
    assert (params["Seed"], params["Steps"], params["Refiner steps"], params["CFG scale"]) == ("8", "4", "2", "5")
    assert params["Size"] == "128x128" and params["Sampler"] == "DDPM"
    assert images[1].text["parameters"] == info["infotexts"][1]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seed + i, not a copy


def test_same_image_as_the_cli_and_the_extension(live, tmp_path, capsys):
    """One seed: the API's image equals `python -m cascade generate`'s and the SD.Next extension pipeline's."""
    from cascade.cli import main
    from extension.pipeline import StableCascadeSingleFilePipeline

    url, worker = live
    status, _, body = txt2img(url, {"prompt": "a lighthouse", "seed": 11, "cfg_scale": 6, **SMALL})
    assert status == 200, body
    api = np.asarray(decode_png(body["images"][0]).convert("RGB"))

    out = tmp_path / "cli.png"
    assert main(["generate", "a lighthouse", "--out", str(out), "--width", "128", "--height", "128", "--seed", "11",
                 "--steps", "4", "--decoder-steps", "2", "--cfg", "6", "--device", "cpu", "--preset", "none",
                 "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), api)

    # What SD.Next hands the extension's pipeline for that body (reference/sdnext.md §3.3 field mapping).
    pipe = StableCascadeSingleFilePipeline.from_engine(worker.session.pipeline)
    out = pipe(prompt="a lighthouse", width=128, height=128, prior_num_inference_steps=4, prior_guidance_scale=6.0,
               num_inference_steps=2, seeds=[11], output_type="pil")
    np.testing.assert_array_equal(np.asarray(out.images[0].convert("RGB")), api)


def test_progress_interrupt_by_name_and_queue_full(live):
    """A runs, B waits (queue of 1), C is refused with 503 + Retry-After; interrupting B by id leaves A running;
    an interrupt without id stops A (the running one) at its next step; the server keeps serving."""
    url, worker = live
    a = Background(url, {**LONG, "force_task_id": "job-a"})
    running_job(worker)
    b = Background(url, {**LONG, "force_task_id": "job-b"})
    wait_until(lambda: worker.queued() == 1, 10, "B queued")
    status, headers, body = txt2img(url, {"prompt": "c", **SMALL})
    assert status == 503 and int(headers["retry-after"]) >= 1 and body["code"] == 503

    status, _, progress = call(url, "GET", "/sdapi/v1/progress")
    assert status == 200 and progress["id"] == "job-a" and 0 < progress["progress"] < 1
    assert progress["state"]["sampling_step"] > 0 and progress["state"]["job_count"] == 1
    assert progress["current_image"] and decode_png(progress["current_image"]).size[0] > 0
    assert "Stage C" in progress["textinfo"]
    status, _, queued = call(url, "GET", "/sdapi/v1/progress?id_task=job-b&skip_current_image=true")
    assert status == 200 and queued["progress"] == 0 and queued["state"]["status"] == "queued"

    assert call(url, "POST", "/sdapi/v1/interrupt?id_task=job-b")[0] == 204
    status, _, body = b.join()
    assert status == 409 and "interrupt" in body["detail"]
    assert worker.running is not None and worker.running.id == "job-a"  # A was not touched

    step_at_interrupt = worker.running.step
    assert call(url, "POST", "/sdapi/v1/interrupt", {})[0] == 204  # SD.Next's: the running one
    status, _, body = a.join()
    assert status == 409 and body["error"] == "Interrupted"
    assert step_at_interrupt < 1000
    assert call(url, "POST", "/sdapi/v1/interrupt?id_task=nope")[0] == 404
    assert txt2img(url, {"prompt": "after", **SMALL})[0] == 200


def test_client_disconnect_cancels_at_the_next_step(live):
    url, worker = live
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/sdapi/v1/txt2img", body=json.dumps({**LONG, "force_task_id": "gone"}),
                 headers={"Content-Type": "application/json"})
    job = running_job(worker)
    assert job.id == "gone"
    conn.close()  # the client goes away mid-generation
    wait_until(lambda: job.state == "failed", 15, "the abandoned job to stop")
    assert job.stop_reason == "disconnect" and job.step < job.total
    assert worker.running is None or worker.running.id != "gone"
    assert txt2img(url, {"prompt": "next", **SMALL})[0] == 200


def test_auth_limits_and_timeout(guarded, live):
    url, worker = guarded
    assert call(url, "GET", "/healthz")[0] == 200  # probes need no credentials
    status, headers, body = call(url, "GET", "/sdapi/v1/sd-models")
    assert status == 401 and headers["www-authenticate"].startswith("Basic") and body["code"] == 401
    bad = base64.b64encode(b"alice:wrong").decode()
    assert call(url, "GET", "/sdapi/v1/sd-models", headers={"Authorization": f"Basic {bad}"})[0] == 401
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
    assert call(url, "GET", "/sdapi/v1/sd-models", headers=good)[0] == 200
    assert call(url, "GET", "/sdapi/v1/sd-models", headers={"Authorization": "Bearer tok123"})[0] == 200
    assert call(live[0], "GET", "/sdapi/v1/sd-models")[0] == 200  # auth off on the other server

    status, _, body = txt2img(url, {"prompt": "x" * (80 * 1024)}, headers=good)
    assert status == 413 and "larger than" in body["detail"]
    status, _, body = txt2img(url, {"prompt": "a", "batch_size": 3, **SMALL}, headers=good)
    assert status == 400 and "at most 2" in body["detail"]

    t0 = time.monotonic()
    status, _, body = txt2img(url, LONG, headers=good)
    assert status == 504 and "timeout" in body["detail"] and time.monotonic() - t0 < 30
    assert txt2img(url, {"prompt": "ok", **SMALL}, headers=good)[0] == 200


@pytest.mark.parametrize("body, status, words", [
    ({"width": 100}, 400, "multiple of 128"),
    ({"sampler_name": "No Such Sampler"}, 400, "sampler"),
    ({"width": 4096, "height": 4096 + 128}, 400, "pixels"),
    ({"sd_model_checkpoint": "../../etc/passwd"}, 400, "path"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, 400, "path"),
    ({"sd_model_checkpoint": "nothing-by-that-name"}, 400, "no model named"),
    ({"steps": "many"}, 400, "prior_steps"),
    ({"enable_hr": True}, 400, "enable_hr"),
])
def test_bad_inputs_answer_4xx_and_the_server_keeps_serving(live, body, status, words):
    url, _ = live
    got, _, answer = txt2img(url, {"prompt": "a", **SMALL, **body})
    assert got == status and words in answer["detail"], answer
    assert answer["error"] and answer["code"] == status  # SD.Next's error JSON


def test_unparseable_bodies_and_images(live):
    url, _ = live
    assert call(url, "POST", "/sdapi/v1/txt2img", b"{not json")[0] == 400
    status, _, body = call(url, "POST", "/sdapi/v1/img2img", {"prompt": "a", "init_images": ["@@@notbase64"], **SMALL})
    assert status == 400 and "base64" in body["detail"]
    junk = base64.b64encode(b"GIF89a but not really").decode()
    assert call(url, "POST", "/sdapi/v1/img2img", {"prompt": "a", "init_images": [junk], **SMALL})[0] == 400
    assert txt2img(url, {"prompt": "still fine", **SMALL})[0] == 200


@pytest.mark.parametrize("body, words", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "width": "128"}, "width"),
    ({"prompt": "a", "batch_size": "2"}, "batch_size"),
    ({"prompt": "a", "n_iter": 1.5}, "n_iter"),
    ({"prompt": "a", "seed": "7"}, "seed"),
    ({"prompt": "a", "cfg_scale": [1]}, "cfg_scale"),
    ({"prompt": "a", "send_images": "yes"}, "send_images"),
    ({"prompt": "a", "sd_model_checkpoint": 3}, "sd_model_checkpoint"),
    ({"prompt": "a", "override_settings": "x"}, "override_settings"),
    ({"prompt": "a", "negative_prompt": {"x": 1}}, "negative_prompt"),
    ({"prompt": "a", "force_task_id": 12}, "force_task_id"),
    ({"prompt": "a", "steps": 10 ** 30}, "steps"),
    ({"prompt": "a" * 20001}, "at most 20000"),
    (["a", "list"], "JSON object"),
    ("a string", "JSON object"),
])
def test_wrong_types_answer_400_with_the_field(live, body, words):
    url, _ = live
    status, _, answer = txt2img(url, {**SMALL, **body} if isinstance(body, dict) else body)
    assert status == 400 and words in answer["detail"], answer
    assert answer["code"] == 400 and answer["error"] == "InvalidRequestError"


def test_hostile_bodies_answer_4xx_and_the_server_keeps_serving(guarded, live):
    """Deeply nested JSON, a chunked body past the limit (no Content-Length to refuse it by), a declared length
    past the limit, undecodable bytes, an image whose header claims more pixels than allowed (no decoding)."""
    url = live[0]
    status, _, body = call(url, "POST", "/sdapi/v1/txt2img", b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "deeply" in body["detail"]
    assert call(url, "POST", "/sdapi/v1/txt2img", b"\xff\xfe\x00garbage")[0] == 400

    guarded_url, good = guarded[0], {"Authorization": "Bearer tok123"}
    host, port = guarded_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b'{"prompt": "' + b"x" * 16 * 1024 if i == 0 else b"x" * 16 * 1024 for i in range(8))
    conn.request("POST", "/sdapi/v1/txt2img", body=chunks, headers={**good, "Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "larger than" in answer["detail"]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/sdapi/v1/txt2img")
    for key, value in {**good, "Content-Type": "application/json", "Content-Length": str(10 ** 12)}.items():
        conn.putheader(key, value)
    conn.endheaders()  # a huge declared body that never comes: refused before it is read
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()

    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # 25 Mpx in a few KB: refused from its header
    bomb = base64.b64encode(buffer.getvalue()).decode()
    status, _, body = call(url, "POST", "/sdapi/v1/img2img", {"prompt": "a", "init_images": [bomb], **SMALL})
    assert status == 400 and "pixels" in body["detail"]
    assert call(url, "GET", "/healthz")[0] == 200
    assert txt2img(url, {"prompt": "still serving", **SMALL})[0] == 200


def test_img2img_from_a_base64_png(live):
    url, _ = live
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 40, 40)).save(buffer, format="PNG")
    status, _, body = call(url, "POST", "/sdapi/v1/img2img", {
        "prompt": "a", "init_images": [base64.b64encode(buffer.getvalue()).decode()], "denoising_strength": 0.5,
        "seed": 3, **SMALL})
    assert status == 200, body
    params = parse_infotext(decode_png(body["images"][0]).text["parameters"])
    assert params["Denoising strength"] == "0.5"


def test_models_options_health_and_metrics(live):
    url, worker = live
    status, _, models = call(url, "GET", "/sdapi/v1/sd-models")
    assert status == 200 and models[0]["model_name"] == worker.catalog.default.name
    assert set(models[0]) == {"title", "model_name", "filename", "type", "sha256", "hash", "config"}
    assert "/" not in models[0]["filename"]  # no server path is shown
    status, _, options = call(url, "GET", "/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == models[0]["title"] and options["cascade_compression"] == 42.0
    status, _, answer = call(url, "POST", "/sdapi/v1/options", {"cascade_compression": 32, "samples_format": "png"})
    assert status == 200 and answer["ignored"] == ["samples_format"]
    try:
        status, _, body = txt2img(url, {"prompt": "a", **SMALL})
        assert parse_infotext(json.loads(body["info"])["infotexts"][0])["Compression"] == "32"
        assert call(url, "POST", "/sdapi/v1/options", {"cascade_compression": 1000})[0] == 400
    finally:
        call(url, "POST", "/sdapi/v1/options", {"cascade_compression": 42})
    status, _, health = call(url, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"] == models[0]["model_name"]
    status, headers, text = call(url, "GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else str(text)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("cascade_requests_total", "cascade_queue_length", "cascade_step_seconds_bucket",
                 "cascade_errors_total", "cascade_images_total"):
        assert name in text
    assert 'cascade_requests_total{endpoint="/sdapi/v1/txt2img",status="200"}' in text


def test_models_are_picked_by_name_from_the_folder_only(session, tiny_pair):
    """--models-dir: its pairs are listed by name (file names relative to the folder) and a request picks one by
    name; the full path of that very file is refused as a model name."""
    from serving.config import ServeConfig

    prior, _ = tiny_pair
    server, url, worker = _start(ServeConfig(device="cpu", models_dir=str(prior.parent)), session)
    try:
        status, _, models = call(url, "GET", "/sdapi/v1/sd-models")
        assert status == 200 and models[0]["model_name"] == worker.catalog.default.name
        (entry,) = [m for m in models[1:] if m["filename"] == prior.name]
        status, _, body = txt2img(url, {"prompt": "a", "seed": 2, "sd_model_checkpoint": entry["title"], **SMALL})
        assert status == 200, body
        info = json.loads(body["info"])
        assert info["model"] == entry["title"] and f"Model: {prior.stem}" in info["infotexts"][0]
        status, _, body = txt2img(url, {"prompt": "a", "sd_model_checkpoint": str(prior), **SMALL})
        assert status == 400 and "path" in body["detail"]
    finally:
        server.__exit__(None, None, None)


def test_the_engine_and_the_extension_never_import_the_serving_packages():
    """`python -m cascade` registers serve/batch (their flags come from serving.cli), yet neither the CLI parser,
    the engine nor the SD.Next glue loads fastapi, uvicorn, ray or prometheus_client."""
    code = ("import sys; from cascade.cli import build_parser; build_parser(); import cascade.session, "
            "cascade.api_fields, extension.pipeline; print([m for m in ('fastapi', 'uvicorn', 'ray', "
            "'prometheus_client', 'starlette') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_serve_command_refuses_a_missing_models_folder_in_one_line(serve_deps, tmp_path):
    out = subprocess.run([sys.executable, "-m", "cascade", "serve", "--models-dir", str(tmp_path / "nope"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no such folder" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2  # the tiny notice + the error


class FakeTasks:
    """What serving.ray_serve.SharedTasks does over the TaskBoard actor, in memory: another replica's task is
    "elsewhere"."""

    def __init__(self):
        self.published, self.stops = {}, []

    async def publish(self, snapshots):
        self.published.update(snapshots)

    async def progress(self, task_id):
        return {"id": "elsewhere", "progress": 0.5} if task_id == "elsewhere" else self.published.get(task_id)

    async def interrupt(self, task_id):
        return task_id == "elsewhere"

    async def take_stops(self):
        out, self.stops = self.stops, []
        return out


def test_tasks_are_shared_between_replicas(session):
    """A replica publishes its tasks' progress, answers for a task running elsewhere, forwards an interrupt by id
    it does not hold, and stops its own task when another replica was asked to."""
    from serving.app import create_app
    from serving.config import ServeConfig
    from serving.server import BackgroundServer
    from serving.worker import Worker

    config = ServeConfig(device="cpu", queue_size=1, timeout_s=60)
    worker, tasks = Worker(config, session=session), FakeTasks()
    with BackgroundServer(create_app(config, worker, tasks=tasks)) as url:
        status, _, answer = call(url, "GET", "/sdapi/v1/progress?id_task=elsewhere")
        assert status == 200 and answer == {"id": "elsewhere", "progress": 0.5}
        assert call(url, "POST", "/sdapi/v1/interrupt?id_task=elsewhere")[0] == 204
        assert call(url, "POST", "/sdapi/v1/interrupt?id_task=nobody")[0] == 404
        mine = Background(url, {**LONG, "force_task_id": "mine"})
        wait_until(lambda: tasks.published.get("mine", {}).get("progress", 0) > 0, 20, "published progress")
        assert tasks.published["mine"]["state"]["status"] == "running"
        tasks.stops.append("mine")  # an interrupt by id that reached another replica
        status, _, body = mine.join()
        assert status == 409 and body["error"] == "Interrupted"
        wait_until(lambda: tasks.published["mine"]["state"]["status"] == "failed", 10, "the final state published")


def test_ray_deployment_options_and_the_documented_serve_yaml():
    """One GPU per replica where the cluster has GPUs, else one CPU; the queue bound plus control slots; autoscaling
    on MIN:MAX; and serving/serve.yaml's `args` are ServeConfig fields (what `serve run` hands build_app)."""
    import dataclasses

    import yaml

    from serving.config import ServeConfig
    from serving.ray_serve import CONTROL_SLOTS, deployment_options, parse_autoscale

    config = ServeConfig(queue_size=3)
    gpu = deployment_options(config, 4, None, gpus=8)
    assert gpu["ray_actor_options"] == {"num_gpus": 1} and gpu["num_replicas"] == 4
    assert gpu["max_ongoing_requests"] == 3 + 1 + CONTROL_SLOTS
    assert gpu["backpressure_config"]["status_code"] == 503 and gpu["backpressure_config"]["retry_after_s"] >= 1
    cpu = deployment_options(config, None, parse_autoscale("1:4"), gpus=0)
    assert cpu["ray_actor_options"] == {"num_cpus": 1} and "num_replicas" not in cpu
    assert (cpu["autoscaling_config"]["min_replicas"], cpu["autoscaling_config"]["max_replicas"]) == (1, 4)
    for bad in ("4", "3:1", "a:b", "0:0"):
        with pytest.raises(CascadeError, match="MIN:MAX"):
            parse_autoscale(bad)

    doc = yaml.safe_load((ROOT / "serving" / "serve.yaml").read_text())
    (app,) = doc["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    args = {k: v for k, v in app["args"].items() if k not in ("replicas", "autoscale")}
    assert set(args) <= {f.name for f in dataclasses.fields(ServeConfig)}
    ServeConfig(**args)
    assert doc["http_options"]["host"] == "127.0.0.1"  # loopback unless the operator changes it


def test_serve_command_starts_and_answers(serve_deps, tmp_path):
    """`python -m serving serve` (what `python -m cascade serve` runs): says it uses the tiny model, answers."""
    from serving.server import free_port

    port = free_port()
    env = {**os.environ, "CASCADE_CACHE_DIR": os.environ["CASCADE_CACHE_DIR"], "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--port", str(port), "--device", "cpu",
                             "--quiet", "--threads", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return call(url, "GET", "/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(up, 90, "the server to start")
        status, _, body = txt2img(url, {"prompt": "a", **SMALL})
        assert status == 200 and len(body["images"]) == 1
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "TINY model with RANDOM weights" in err and "127.0.0.1" in err


# --- batch jobs (local) -------------------------------------------------------------------------------------------
def _jobs(path: Path) -> Path:
    lines = [
        json.dumps({"prompt": "one", "seed": 5, "batch_size": 2, **SMALL}),
        "{this is not json",
        json.dumps({"prompt": "two", "seed": -1, **SMALL}),
        json.dumps({"prompt": "bad", "width": 100}),
        json.dumps({"prompt": "three", "seed": 9, "n_iter": 2, **SMALL}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_batch_resumes_with_every_image_once(serve_deps, tmp_path):
    from serving.batch import run_batch_jobs
    from serving.config import ServeConfig

    jobs, out, said = _jobs(tmp_path / "jobs.jsonl"), tmp_path / "out", []
    config = ServeConfig(device="cpu")
    first = run_batch_jobs(jobs, out, config, quiet=True, stop_after=2, report=said.append)
    assert first.made == 2 and first.bad_lines == 2
    assert any(s.startswith("jobs.jsonl:2:") and "JSON" in s for s in said)
    assert any(s.startswith("jobs.jsonl:4:") and "multiple of 128" in s for s in said)
    # A crash after the PNG of the next image and before its record, a torn record, a temporary file:
    (out / "000003-000.png").write_bytes(b"half")
    with open(out / "results.jsonl", "a") as f:
        f.write('{"line": 5, "ind')
    (out / ".000005-000.png.abc.partial").write_bytes(b"x")

    second = run_batch_jobs(jobs, out, config, quiet=True, report=said.append)
    assert second.skipped == 2 and second.made == 3 and not second.failed
    records = manifest(out)
    keys = sorted((r["line"], r["index"]) for r in records)
    assert keys == [(1, 0), (1, 1), (3, 0), (5, 0), (5, 1)]  # every image exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in records] + ["results.jsonl"])
    by_key = {(r["line"], r["index"]): r for r in records}
    assert [by_key[(1, i)]["seed"] for i in (0, 1)] == [5, 6] and [by_key[(5, i)]["seed"] for i in (0, 1)] == [9, 10]
    params = parse_infotext(Image.open(out / "000003-000.png").text["parameters"])
    assert params["Prompt"] == "two" and int(params["Seed"]) == by_key[(3, 0)]["seed"]

    third = run_batch_jobs(jobs, out, config, quiet=True, report=said.append)
    assert third.made == 0 and third.skipped == 5 and len(manifest(out)) == 5


def test_controlnets_by_name_from_the_models_folder(session, live, tmp_path):
    """Issue 13: a ControlNet of `<--models-dir>/ControlNet`, picked by name in `controlnets` (or SD.Next's
    `extra.cascade_controlnets`, the same image) with a base64 photo and canny on: the CLI's image for
    `--controlnet FILE:canny=PHOTO:0.8`, recorded in the infotext; strength 0 is no ControlNet; an unknown name, a
    path, both spellings at once or a server without a models folder answer 400 with the reason."""
    from cascade import tiny
    from cascade.cli import main
    from serving.config import ServeConfig

    folder = tmp_path / "models" / "ControlNet"
    folder.mkdir(parents=True)
    cnet = tiny.write_tiny_controlnet(folder / "tiny_canny.safetensors", "canny")
    photo = Image.new("RGB", (128, 128), (20, 20, 20))
    photo.paste((230, 230, 230), (32, 32, 96, 96))
    photo.save(tmp_path / "photo.png")
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    item = {"model": "tiny_canny", "image": base64.b64encode(buf.getvalue()).decode(), "canny": True, "strength": 0.8}
    base = {"prompt": "a lighthouse", "seed": 11, "cfg_scale": 6, **SMALL}
    server, url, worker = _start(ServeConfig(device="cpu", models_dir=str(tmp_path / "models")), session)

    def pixels(body):
        status, _, out = txt2img(url, body)
        assert status == 200, out
        return np.asarray(decode_png(out["images"][0]).convert("RGB")), out

    try:
        controlled, out = pixels({**base, "controlnets": [item]})
        assert "ControlNet: tiny_canny 0.8 0-1" in json.loads(out["info"])["infotexts"][0]
        assert out["parameters"]["controlnets"][0]["model"] == "tiny_canny"  # echoed as SD.Next echoes bodies
        np.testing.assert_array_equal(pixels({**base, "extra": {"cascade_controlnets": [item]}})[0], controlled)
        plain = pixels(base)[0]
        assert not np.array_equal(plain, controlled)
        np.testing.assert_array_equal(pixels({**base, "controlnets": [{**item, "strength": 0}]})[0], plain)
        cli = tmp_path / "cli.png"
        assert main(["generate", "a lighthouse", "--out", str(cli), "--width", "128", "--height", "128", "--seed",
                     "11", "--steps", "4", "--decoder-steps", "2", "--cfg", "6", "--device", "cpu", "--preset",
                     "none", "--quiet", "--controlnet", f"{cnet}:canny={tmp_path / 'photo.png'}:0.8"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(cli).convert("RGB")), controlled)
        for body, words in [({"controlnets": [{**item, "model": "nope"}]}, "no ControlNet named 'nope'.*tiny_canny"),
                            ({"controlnets": [{**item, "model": str(cnet)}]}, "looks like a path"),
                            ({"controlnets": [item], "extra": {"cascade_controlnets": [item]}}, "both"),
                            ({"controlnets": {"model": "tiny_canny"}}, "must be a list"),
                            ({"override_settings": {"cascade_controlnets": [item]}}, "not a Stable Cascade option"),
                            ({"controlnets": [{**item, "start": 0.9, "end": 0.1}]}, "start 0.9 is after its end")]:
            status, _, out = txt2img(url, {**base, **body})
            assert status == 400 and re.search(words, out["detail"]), (body, out)
            assert str(tmp_path) not in out["detail"].replace(str(cnet), "")  # only the client's own text
        (folder / "not_a_cnet.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        status, _, out = txt2img(url, {**base, "controlnets": [{**item, "model": "not_a_cnet"}]})
        assert status == 422 and "not_a_cnet" in out["detail"], out  # an unusable file of the folder
    finally:
        server.__exit__(None, None, None)
    status, _, out = txt2img(live[0], {**base, "controlnets": [item]})
    assert status == 400 and "--models-dir" in out["detail"], out


def test_echoed_parameters_elide_long_strings_at_any_depth(serve_deps):
    """SD.Next's `parameters` echo shows long strings as `<str N>`; a ControlNet item's base64 image too."""
    from serving.app import echo_parameters

    echoed = echo_parameters({"prompt": "p" * 1000, "controlnets": [{"model": "c", "image": "x" * 2000}],
                              "init_images": ["y"]})
    assert echoed == {"prompt": "<str 1000>", "controlnets": [{"model": "c", "image": "<str 2000>"}]}


def test_batch_lines_with_controlnets_are_refused_not_ignored(tmp_path):
    """Batch jobs have no ControlNet folder: a line with ControlNets is a bad line with the reason (never an image
    made without them)."""
    from serving.batch import BadLine, plan

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a", "seed": 1, "extra": {"cascade_controlnets": [{"model": "c"}]}}) + "\n")
    (line,) = list(plan(jobs))
    assert isinstance(line, BadLine) and "cascade_controlnets" in line.error and "not supported in batch" in line.error
