"""The extension inside a real SD.Next: list, select, generate, progress, interrupt, errors.

Runs only when SDNEXT_DIR points at an SD.Next checkout (vladmandic/sdnext) whose dependencies are installed;
SDNEXT_PYTHON is the interpreter of its venv (default: <SDNEXT_DIR>/venv/bin/python, then <SDNEXT_DIR>/../venv).
SD.Next is started on a free port with a temporary data folder and a temporary extensions folder holding a link to
this repository; tiny random-weight checkpoints (real ComfyUI layouts) are written into the extension's model
folder. SD.Next is always stopped at the end. Startup takes ~20-50 s on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDNEXT_DIR = os.environ.get("SDNEXT_DIR")
MODEL = "Diffusers/tiny_sc_main"
STARTUP_TIMEOUT = 300

pytestmark = [
    pytest.mark.sdnext,
    pytest.mark.skipif(not SDNEXT_DIR, reason="SDNEXT_DIR is not set: point it at an SD.Next checkout (and "
                                                 "SDNEXT_PYTHON at its venv's python) to run the SD.Next tests"),
]
TIMINGS: dict[str, float] = {}


def _python(root: Path) -> Path:
    candidates = [os.environ.get("SDNEXT_PYTHON"), root / "venv" / "bin" / "python", root.parent / "venv" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    pytest.skip(f"no Python for SD.Next found (set SDNEXT_PYTHON; tried {[str(c) for c in candidates if c]})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def post(self, path: str, body: dict | None = None, **kw):
        return self.call("POST", path, body if body is not None else {}, **kw)

    def txt2img(self, **fields):
        body = {"prompt": "a (red:1.2) fox in the snow", "negative_prompt": "blurry", "width": 512, "height": 512,
                "steps": 4, "refiner_steps": 3, "cfg_scale": 4.0, "seed": 7, **fields}
        return self.post("/sdapi/v1/txt2img", body)


def _write_checkpoints(models_dir: Path, outside: Path) -> None:
    from cascade import tiny

    models = tiny.build_tiny_models(seed=0)
    folder = models_dir / "StableCascade"
    folder.mkdir(parents=True)
    tiny.write_comfyui_stage_c(folder / "tiny_sc_main.safetensors", models)
    tiny.write_comfyui_stage_b(folder / "tiny_sc_decoder.safetensors", models)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    outside.mkdir(parents=True)
    tiny.write_comfyui_stage_b(outside / "stablecascade-decoder-only.safetensors", models)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # SD.Next logs "Exiting" and stops in a few seconds
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def sdnext(tmp_path_factory):
    root = Path(SDNEXT_DIR).resolve()
    if not (root / "launch.py").is_file() or not (root / "modules").is_dir():
        pytest.skip(f"SDNEXT_DIR={root} is not an SD.Next checkout (no launch.py / modules/)")
    python = _python(root)
    base = tmp_path_factory.mktemp("sdnext")
    data, extensions, outside = base / "data", base / "extensions", base / "outside"
    data.mkdir()
    extensions.mkdir()
    (extensions / "sd-cascade").symlink_to(ROOT, target_is_directory=True)
    (data / "config.json").write_text(json.dumps({"sd_checkpoint_autoload": False, "sd_checkpoint_autodownload": False,
                                                  "offline_mode": True}))
    _write_checkpoints(data / "models", outside)
    port = _free_port()
    log_path = base / "sdnext.log"
    env = {**os.environ, "GIT_PYTHON_REFRESH": "quiet", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "CASCADE_CACHE_DIR"):
        env.pop(key, None)
    cmd = [str(python), "launch.py", "--skip-all", "--experimental", "--data-dir", str(data), "--port", str(port),
           "--extensions-dir", str(extensions)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    client = Client(port)
    try:
        while True:  # the extension's routes appear ~0.5 s after "Local URL"; poll one of them
            if proc.poll() is not None:
                pytest.fail(f"SD.Next exited with {proc.returncode} during startup:\n{log_path.read_text()[-4000:]}")
            if time.perf_counter() - t0 > STARTUP_TIMEOUT:
                pytest.fail(f"SD.Next did not answer within {STARTUP_TIMEOUT}s:\n{log_path.read_text()[-4000:]}")
            try:
                status, _ = client.get("/cascade/v1/models", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        TIMINGS["sdnext_start_s"] = time.perf_counter() - t0
        yield SimpleNamespace(client=client, data=data, outside=outside, log=log_path, python=python, root=root)
    finally:
        _stop(proc)
        print(f"\nSD.Next timings: {json.dumps({k: round(v, 2) for k, v in TIMINGS.items()})}  log: {log_path}")


def _image(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _select(client: Client, title: str) -> None:
    status, body = client.post("/sdapi/v1/options", {"sd_model_checkpoint": title})
    assert status == 200, body


# --- the checks, in order ------------------------------------------------------------------------------------------


def test_model_is_listed(sdnext):
    status, models = sdnext.client.get("/sdapi/v1/sd-models")
    assert status == 200
    titles = [m["title"] for m in models]
    assert MODEL in titles
    assert not any("decoder" in t or "broken" in t for t in titles)  # a Stage B alone is never a model
    status, ours = sdnext.client.get("/cascade/v1/models")
    assert status == 200
    pair = next(p for p in ours["pairs"] if p["title"] == MODEL)
    assert (pair["prior"], pair["decoder"], pair["rule"]) == ("tiny_sc_main.safetensors", "tiny_sc_decoder.safetensors", "name")
    roles = {f["file"]: f["role"] for f in ours["files"]}
    assert roles["tiny_sc_main.safetensors"] == "stage_c" and roles["tiny_sc_decoder.safetensors"] == "stage_b"
    assert any("broken.safetensors" in p for p in ours["problems"])


def test_selecting_the_model_loads_it(sdnext):
    t0 = time.perf_counter()
    _select(sdnext.client, MODEL)
    TIMINGS["model_load_s"] = time.perf_counter() - t0
    status, ours = sdnext.client.get("/cascade/v1/models")
    pair = next(p for p in ours["pairs"] if p["title"] == MODEL)
    assert pair["loaded"] and pair["memory"] == "resident" and pair["load_error"] is None


def test_txt2img_image_size_and_infotext(sdnext):
    status, body = sdnext.client.txt2img(sd_model_checkpoint=MODEL)  # warm-up run (first torch calls are slow)
    assert status == 200 and len(body["images"]) == 1
    t0 = time.perf_counter()
    status, body = sdnext.client.txt2img()
    TIMINGS["txt2img_512_s"] = time.perf_counter() - t0
    assert status == 200 and _image(body["images"][0]).size == (512, 512)

    status, body = sdnext.client.txt2img(width=384, height=640, refiner_steps=2, cfg_image=1.5, batch_size=2,
                                         override_settings={"cascade_decoder_sampler": "dpmpp_2m"},
                                         extra={"cascade_compression": 36})
    assert status == 200, body
    assert [(_image(b).size) for b in body["images"]] == [(384, 640), (384, 640)]
    info = json.loads(body["info"])
    text = info["infotexts"][1]
    for field in ("Refiner steps: 2", "Image CFG scale: 1.5", "Decoder sampler: DPM++ 2M",
                  "Decoder schedule type: Karras", "Compression: 36", "Sampler: DDPM", "Decoder: tiny_sc_decoder",
                  "Seed: 8"):
        assert field in text, text
    status, png = sdnext.client.post("/sdapi/v1/png-info", {"image": body["images"][1]})
    assert status == 200
    parsed = png["parameters"]  # what PNG Info and "send to txt2img" read back
    assert parsed["Steps"] == 4 and parsed["Refiner steps"] == 2 and parsed["CFG scale"] == 4.0
    assert parsed["Image CFG scale"] == 1.5 and parsed["Decoder sampler"] == "DPM++ 2M"


def _run_in_background(client: Client, **fields) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def work():
        t0 = time.perf_counter()
        result["status"], result["body"] = client.txt2img(**fields)
        result["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, result


LONG = dict(width=1024, height=1024, steps=200, refiner_steps=40)


def _wait_for_step(client: Client, minimum: int, total: int, timeout: float = 120) -> dict:
    """Wait until *this* run (bar sized `total`) reached `minimum` steps: a stop sent earlier would be lost, as
    SD.Next clears its interrupt/skip flags when the pipeline call begins."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        _, progress = client.get("/sdapi/v1/progress?skip_current_image=true")
        state = progress["state"]
        if state["sampling_steps"] == total and state["sampling_step"] >= minimum:
            return progress
        time.sleep(0.1)
    pytest.fail(f"progress did not reach step {minimum}")


def test_progress_moves_through_both_stages(sdnext):
    thread, result = _run_in_background(sdnext.client, width=512, height=512, steps=60, refiner_steps=60)
    seen = []
    while thread.is_alive():
        _, progress = sdnext.client.get("/sdapi/v1/progress?skip_current_image=true")
        seen.append((progress["state"]["sampling_step"], progress["state"]["sampling_steps"], progress["progress"],
                     progress.get("textinfo") or ""))
        time.sleep(0.05)
    thread.join()
    assert result["status"] == 200 and len(result["body"]["images"]) == 1
    steps = [s for s, total, _, _ in seen if total == 120]
    assert len(set(steps)) >= 3 and steps == sorted(steps)  # moves forward, bar sized prior + decoder
    assert any("Stage C" in t for *_, t in seen) and any("Stage B" in t for *_, t in seen)
    assert max(p for _, _, p, _ in seen) > 0.5


def _interrupt_at_step(client: Client, step: int, **fields) -> dict:
    thread, result = _run_in_background(client, **LONG, **fields)
    _wait_for_step(client, step, total=240)
    status, _ = client.post("/sdapi/v1/interrupt")
    assert status == 204
    thread.join(120)
    assert not thread.is_alive()
    _, progress = client.get("/sdapi/v1/progress?skip_current_image=true")
    assert progress["state"]["sampling_step"] < 240
    return result


def test_interrupt_stops_a_run(sdnext):
    """Interrupt ends the run between steps. What comes back is SD.Next's choice (modules/processing.py
    process_images_inner, on `state.interrupted`): with its "Save interrupted images" option (`keep_incomplete`,
    default on) the last live preview (`state.current_image`, ours: the Stage C previewer's small image) replaces
    the batch's samples; with it off, nothing comes back."""
    result = _interrupt_at_step(sdnext.client, 5, keep_incomplete=False)
    assert result["status"] == 200 and result["body"]["images"] == []  # what finished: nothing (one batch)
    TIMINGS["interrupt_return_s"] = result["seconds"]
    result = _interrupt_at_step(sdnext.client, 5)
    assert result["status"] == 200 and len(result["body"]["images"]) == 1
    preview = _image(result["body"]["images"][0])
    assert preview.size[0] < LONG["width"] and preview.size[0] == preview.size[1]  # the preview, not an image


def test_skip_moves_on_to_the_next_batch(sdnext):
    thread, result = _run_in_background(sdnext.client, n_iter=2, **{**LONG, "steps": 60, "refiner_steps": 10})
    _wait_for_step(sdnext.client, 3, total=70)
    assert sdnext.client.post("/sdapi/v1/skip")[0] == 204
    thread.join(300)
    assert result["status"] == 200
    infos = json.loads(result["body"]["info"])["infotexts"]
    assert len(result["body"]["images"]) == 1 and "Seed: 8" in infos[0]  # batch 1 skipped, batch 2 made


def test_wrong_file_is_an_error_and_the_next_request_works(sdnext):
    lone = sdnext.outside / "stablecascade-decoder-only.safetensors"
    status, body = sdnext.client.txt2img(sd_model_checkpoint=str(lone), width=256, height=256)
    assert status == 422, body
    assert "Stage B (decoder) file, not a model on its own" in body["detail"]
    status, body = sdnext.client.txt2img(sd_model_checkpoint=MODEL, width=256, height=256)
    assert status == 200 and len(body["images"]) == 1


def test_bad_request_is_an_error_not_an_empty_success(sdnext):
    status, body = sdnext.client.txt2img(width=320, height=256)
    assert status == 400 and "multiple of 128" in body["detail"]
    status, body = sdnext.client.txt2img(sampler_name="DEIS", width=256, height=256)
    assert status == 400 and "not available for Stable Cascade" in body["detail"]
    status, body = sdnext.client.txt2img(width=256, height=256)
    assert status == 200 and len(body["images"]) == 1


def test_extension_routes(sdnext):
    status, backends = sdnext.client.get("/cascade/v1/backends")
    assert status == 200 and backends["sdnext"]["backend"] == backends["selected"]["name"]
    status, plan = sdnext.client.get("/cascade/v1/plan?width=1024&height=1536")
    assert status == 200 and plan["model"] == "tiny_sc_main" and plan["fits"] and plan["width"] == 1024
    status, _ = sdnext.client.get("/cascade/v1/plan?width=1024&height=1024&model=nope")
    assert status == 404
    status, refreshed = sdnext.client.post("/cascade/v1/refresh")
    assert status == 200 and refreshed["sync"]["unchanged"] == ["tiny_sc_main"]


def test_balanced_offload_mode_is_followed(sdnext):
    client = sdnext.client
    assert client.post("/sdapi/v1/options", {"diffusers_offload_mode": "balanced"})[0] == 200
    try:
        status, body = client.txt2img(width=256, height=256)  # loaded under "none": the switch needs a reload
        assert status == 409 and "reload-checkpoint?force=true" in body["detail"]
        assert client.post("/sdapi/v1/reload-checkpoint?force=true")[0] == 204
        status, body = client.txt2img(width=256, height=256)
        assert status == 200 and len(body["images"]) == 1
        _, ours = client.get("/cascade/v1/models")
        assert next(p for p in ours["pairs"] if p["title"] == MODEL)["memory"] == "sdnext-balanced"
    finally:
        client.post("/sdapi/v1/options", {"diffusers_offload_mode": "none"})
        client.post("/sdapi/v1/reload-checkpoint?force=true")


def test_install_py_does_nothing_when_everything_is_there(sdnext):
    env = {**os.environ, "PYTHONPATH": str(sdnext.root)}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run([str(sdnext.python), "install.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip" not in (done.stdout + done.stderr).lower()
