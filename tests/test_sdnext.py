"""The extension inside a real SD.Next: list, select, generate, progress, interrupt, errors.

Runs only when SDNEXT_DIR points at an SD.Next checkout (vladmandic/sdnext) whose dependencies are installed;
SDNEXT_PYTHON is the interpreter of its venv (default: <SDNEXT_DIR>/venv/bin/python, then <SDNEXT_DIR>/../venv).
SD.Next is started on a free port with a temporary data folder and a temporary extensions folder holding a link to
this repository; tiny random-weight checkpoints (real ComfyUI layouts) are written into the extension's model
folder. SD.Next is always stopped at the end. Startup takes ~20-50 s on a CPU.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus" / "headers"  # malformed headers (issue 10) and the words each error must say
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
    shutil.copytree(CORPUS, folder / "corpus", ignore=shutil.ignore_patterns("*.json"))  # issue 10's malformed files
    _write_loras(models_dir / "Lora", models)
    (folder / "ControlNet").mkdir()  # the extension's rule: <its model folder>/ControlNet (extension/controlnet.py)
    tiny.write_tiny_controlnet(folder / "ControlNet" / "tiny_canny.safetensors", "canny")


def _lora_factors(out_dim: int, in_shape: tuple[int, ...], seed: int, rank: int = 4):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn((rank, *in_shape), generator=g) * 0.5,
            torch.randn((out_dim, rank, *([1] * (len(in_shape) - 1))), generator=g) * 0.5)


def _write_loras(folder: Path, models) -> None:
    """SD.Next's Lora folder: a kohya-named LoRA for the tiny model (one Stage C linear, one 1x1 conv, one CLIP-G
    linear: names as kohya sd-scripts' stable-cascade branch writes them, as in tests/test_lora.py) and an SDXL one
    (`lora_te1_` names: another family)."""
    import torch

    from cascade.tensorfile import write_safetensors

    q = models.prior.get_submodule("down_blocks.0.2.attention.to_q").weight
    clf = models.prior.get_submodule("clf.1").weight
    te = models.text_encoder.get_submodule("text_model.encoder.layers.0.self_attn.q_proj").weight
    layers = {"lora_unet_down_blocks_0_2_attention_attn_to_q": _lora_factors(q.shape[0], (q.shape[1],), 1),
              "lora_unet_clf_1": _lora_factors(clf.shape[0], tuple(clf.shape[1:]), 2),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": _lora_factors(te.shape[0], (te.shape[1],), 3)}
    tensors = {}
    for name, (down, up) in layers.items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)}
    folder.mkdir(parents=True)
    write_safetensors(folder / "tiny_style.safetensors", tensors)
    down, up = _lora_factors(768, (768,), 4, rank=2)
    write_safetensors(folder / "sdxl_style.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up})


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
    # server_rate_limit 0: SD.Next's API limiter (modules/api/validate.py, 300 per minute per client and route, a
    # txt2img costs 5) would answer the fuzz's requests with 429
    (data / "config.json").write_text(json.dumps({"sd_checkpoint_autoload": False, "sd_checkpoint_autodownload": False,
                                                  "offline_mode": True, "server_rate_limit": 0}))
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


@pytest.fixture(autouse=True)
def _timed(request):
    t0 = time.perf_counter()
    yield
    TIMINGS[f"test:{request.node.name.removeprefix('test_')}"] = time.perf_counter() - t0


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


def _problem_for(problems: list[str], name: str) -> str:
    found = [p for p in problems if p.startswith(name + ":")]
    assert len(found) == 1, (name, problems)
    return found[0]


def _check_corpus_listed(ours: dict, folder: str) -> int:
    """Every corpus file is listed once as a problem carrying its reason (tests/corpus/headers/MANIFEST.json), has
    an error and no role in `files`, and became no model."""
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    files = {f["file"]: f for f in ours["files"]}
    for name, expected in manifest.items():
        shown = f"{folder}/{name}"
        reason = _problem_for(ours["problems"], shown)
        assert expected["words"].lower() in reason.lower(), (name, expected["words"], reason)
        assert files[shown]["role"] is None and files[shown]["error"], files[shown]
    assert [p["name"] for p in ours["pairs"]] == ["tiny_sc_main"]
    return len(manifest)


def test_malformed_files_at_startup_are_problems_not_failures(sdnext):
    """Issue 10: malformed .safetensors files in the model folder when SD.Next starts (the whole header corpus of
    tests/corpus/headers) — the extension loaded (its routes answer), each file is one problem with its reason, and
    the good pair is still a model (it loads and generates in the tests below)."""
    status, ours = sdnext.client.get("/cascade/v1/models")
    assert status == 200
    TIMINGS["malformed_files_at_startup"] = _check_corpus_listed(ours, "corpus")
    status, plan = sdnext.client.get("/cascade/v1/plan?width=1024&height=1024")
    assert status == 200 and plan["model"] == "tiny_sc_main"
    assert sdnext.client.get("/cascade/v1/backends")[0] == 200
    status, models = sdnext.client.get("/sdapi/v1/sd-models")
    assert status == 200 and [m["title"] for m in models] == [MODEL]
    status, info = sdnext.client.get("/sdapi/v1/options-info")
    assert status == 200 and info["options"]["cascade_compression"]["section_title"] == "Stable Cascade"


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


def _interrupt_at_step(client: Client, step: int, prior_steps: int, **fields) -> dict:
    """Interrupt a LONG run with `prior_steps` Stage C steps: runs that follow each other differ in their bar's size,
    so the progress of the one before (SD.Next keeps it until the next run's bar is set) is never taken for this."""
    total = prior_steps + LONG["refiner_steps"]
    thread, result = _run_in_background(client, **{**LONG, "steps": prior_steps}, **fields)
    _wait_for_step(client, step, total=total)
    status, _ = client.post("/sdapi/v1/interrupt")
    assert status == 204
    thread.join(120)
    assert not thread.is_alive()
    _, progress = client.get("/sdapi/v1/progress?skip_current_image=true")
    assert progress["state"]["sampling_step"] < total
    return result


def test_interrupt_stops_a_run(sdnext):
    """Interrupt ends the run between steps. What comes back is SD.Next's choice (modules/processing.py
    process_images_inner, on `state.interrupted`): with its "Save interrupted images" option (`keep_incomplete`,
    default on) the last live preview (`state.current_image`, ours: the Stage C previewer's small image) replaces
    the batch's samples; with it off, nothing comes back."""
    result = _interrupt_at_step(sdnext.client, 5, 200, keep_incomplete=False)
    assert result["status"] == 200 and result["body"]["images"] == []  # what finished: nothing (one batch)
    TIMINGS["interrupt_return_s"] = result["seconds"]
    result = _interrupt_at_step(sdnext.client, 5, 190)
    assert result["status"] == 200 and len(result["body"]["images"]) == 1
    preview = _image(result["body"]["images"][0])
    assert preview.size[0] < LONG["width"] and preview.size[0] == preview.size[1]  # the preview, not an image


def test_live_preview_during_txt2img(sdnext):
    """Issue 12: SD.Next's live preview pane (/sdapi/v1/progress `current_image`) shows our previews during a run,
    with SD.Next's default preview settings (method and refresh period)."""
    client = sdnext.client
    thread, result = _run_in_background(client, **LONG)
    preview, t0 = None, time.perf_counter()
    try:
        while preview is None and thread.is_alive() and time.perf_counter() - t0 < 60:
            _, progress = client.get("/sdapi/v1/progress")
            if progress.get("current_image") and progress["state"]["sampling_steps"] == 240:
                preview = _image(progress["current_image"])
            time.sleep(0.1)
    finally:
        client.post("/sdapi/v1/interrupt")
        thread.join(120)
    assert preview is not None and preview.size[0] > 0 and preview.mode in ("RGB", "RGBA")


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
    status, body = sdnext.client.txt2img(width=500, height=256)  # SD.Next rounds to 496; the error says 500
    assert status == 400 and "width 500 (SD.Next rounded it to 496)" in body["detail"], body
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


def test_malformed_files_added_before_refresh(sdnext):
    """Issue 10: malformed files copied in while SD.Next runs, then POST /cascade/v1/refresh: 200, each listed as a
    problem with its reason, the model unchanged and still generating; a truncated copy of the real Stage C too."""
    folder = sdnext.data / "models" / "StableCascade"
    added = folder / "added"
    shutil.copytree(CORPUS, added, ignore=shutil.ignore_patterns("*.json"))
    main = (folder / "tiny_sc_main.safetensors").read_bytes()
    (added / "truncated_main.safetensors").write_bytes(main[: len(main) // 2])
    (added / "text.safetensors").write_text("not a checkpoint\n")
    try:
        status, refreshed = sdnext.client.post("/cascade/v1/refresh")
        assert status == 200, refreshed
        assert refreshed["sync"]["unchanged"] == ["tiny_sc_main"] and refreshed["sync"]["written"] == []
        _check_corpus_listed(refreshed, "added")
        for name in ("truncated_main.safetensors", "text.safetensors"):
            assert len(_problem_for(refreshed["problems"], f"added/{name}")) > len(f"added/{name}: ") + 10
        assert sdnext.client.get("/cascade/v1/models")[0] == 200
        assert sdnext.client.get("/cascade/v1/plan?width=1024&height=1024")[0] == 200
        status, body = sdnext.client.txt2img(sd_model_checkpoint=MODEL, width=256, height=256)
        assert status == 200 and len(body["images"]) == 1
    finally:
        shutil.rmtree(added)
        status, refreshed = sdnext.client.post("/cascade/v1/refresh")
    assert status == 200 and not any(p.startswith("added/") for p in refreshed["problems"])


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pixels(b64: str) -> bytes:
    return _image(b64).convert("RGB").tobytes()  # JPEG/PNG bytes carry the infotext; compare what is drawn


SMALL = dict(width=256, height=256, steps=3, refiner_steps=2, seed=7)


def test_hires_fix_and_image_prompts_through_sdnext(sdnext):
    """Issue 12: hires fix at scale 2 is Stage B's 2x upscale (one pass, twice the size, "Upscale: 2" recorded);
    a whole-factor rule is enforced (1.5 -> 4xx with the fix); image prompts arrive as base64 in `extra` and change
    the image, deterministically."""
    from PIL import Image

    status, body = sdnext.client.txt2img(prompt="a fox", enable_hr=True, hr_scale=2, **SMALL)
    assert status == 200 and len(body["images"]) == 1, body
    assert _image(body["images"][0]).size == (512, 512)
    assert "Upscale: 2" in json.loads(body["info"])["infotexts"][0]
    status, body = sdnext.client.txt2img(prompt="a fox", enable_hr=True, hr_scale=1.5, **SMALL)
    assert 400 <= status < 500 and "Hires scale to 2" in json.dumps(body), body
    red = _png(Image.new("RGB", (96, 64), (200, 30, 30)))
    plain = _pixels(sdnext.client.txt2img(prompt="", **SMALL)[1]["images"][0])
    runs = [sdnext.client.txt2img(prompt="", extra={"cascade_image_prompts": [red]}, **SMALL) for _ in range(2)]
    assert all(status == 200 for status, _ in runs), runs
    varied = [_pixels(body["images"][0]) for _, body in runs]
    assert varied[0] == varied[1] != plain


def test_img2img_through_sdnext(sdnext):
    """Issue 12: /sdapi/v1/img2img with init_images + denoising_strength runs our img2img: deterministic per seed,
    changes with the init image and the strength, differs from txt2img, keeps the requested size, and the infotext
    (and PNG Info) carries the strength (SD.Next itself writes it only for its own img2img task types)."""
    from PIL import Image

    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    red = Image.new("RGB", (256, 256), (200, 30, 30))

    def img2img(init, strength):
        status, body = sdnext.client.post("/sdapi/v1/img2img", {
            "prompt": "a fox", "init_images": [_png(init)], "denoising_strength": strength, **SMALL})
        assert status == 200 and len(body["images"]) == 1, body
        return body

    first = img2img(noise, 0.5)
    assert _image(first["images"][0]).size == (256, 256)
    assert _pixels(img2img(noise, 0.5)["images"][0]) == _pixels(first["images"][0])
    assert _pixels(img2img(red, 0.5)["images"][0]) != _pixels(first["images"][0])
    assert _pixels(img2img(noise, 0.9)["images"][0]) != _pixels(first["images"][0])
    status, plain = sdnext.client.txt2img(prompt="a fox", **SMALL)
    assert status == 200 and _pixels(plain["images"][0]) != _pixels(first["images"][0])
    text = json.loads(first["info"])["infotexts"][0]
    assert "Denoising strength: 0.5" in text, text
    status, png = sdnext.client.post("/sdapi/v1/png-info", {"image": first["images"][0]})
    assert status == 200 and png["parameters"]["Denoising strength"] == 0.5
    status, body = sdnext.client.post("/sdapi/v1/img2img", {
        "prompt": "a fox", "init_images": [_png(noise)], "denoising_strength": 1.5, **SMALL})
    assert 400 <= status < 500 and "1.5" in body["detail"], body


def _addnet_hash(path: Path) -> str:
    """SD.Next's LoRA hash (modules/hashes.py addnet_hash_safetensors): sha256 of the bytes after the header."""
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + struct.unpack("<Q", raw[:8])[0]:]).hexdigest()


def test_lora_in_the_prompt(sdnext):
    """Issue 13: `<lora:name:w>` from SD.Next's Lora folder applies to our model (through the diffusers LoRA calls
    SD.Next makes for model type 'sc'): it changes the image, weight 0 and a prompt without it give the plain
    image bit for bit (A/B/A), the infotext has SD.Next's LoRA networks / LoRA hashes fields, and a LoRA for
    another family is an error that names it, after which generation goes on."""
    client = sdnext.client
    status, loras = client.get("/sdapi/v1/loras")
    assert status == 200 and {"tiny_style", "sdxl_style"} <= {item["name"] for item in loras}

    def run(prompt, **fields):
        status, body = client.txt2img(prompt=prompt, **{**SMALL, **fields})
        assert status == 200 and len(body["images"]) == 1, body
        return _pixels(body["images"][0]), json.loads(body["info"])["infotexts"][0]

    plain, _ = run("a fox")
    styled, text = run("a fox <lora:tiny_style:0.8>", override_settings={"lora_add_hashes_to_infotext": True})
    assert styled != plain
    digest = _addnet_hash(sdnext.data / "models" / "Lora" / "tiny_style.safetensors")
    assert "LoRA networks: tiny_style" in text and f"LoRA hashes: {digest[:8]}" in text, text
    assert run("a fox <lora:tiny_style:0.8>")[0] == styled
    assert run("a fox <lora:tiny_style:0.4>")[0] not in (plain, styled)
    assert run("a fox")[0] == plain  # restored bit for bit
    assert run("a fox <lora:tiny_style:0>")[0] == plain
    status, body = client.txt2img(prompt="a fox <lora:sdxl_style:1>", **SMALL)
    assert status == 422 and "SDXL" in body["detail"] and "sdxl_style" in body["detail"], body
    assert run("a fox <lora:tiny_style:0.8>")[0] == styled
    assert run("a fox")[0] == plain


def test_missing_lora_name_does_not_keep_the_previous_lora(sdnext):
    """SD.Next calls no LoRA method when every LoRA the prompt names is missing from its folder
    (modules/lora/extra_networks_lora.py, diffusers method): the extension compares p.network_data with what is
    merged and restores the weights, so the image is the plain one."""
    plain = _pixels(sdnext.client.txt2img(prompt="a fox", **SMALL)[1]["images"][0])
    sdnext.client.txt2img(prompt="a fox <lora:tiny_style:0.8>", **SMALL)
    try:
        status, body = sdnext.client.txt2img(prompt="a fox <lora:no_such_lora:1>", **SMALL)
        assert status >= 400 or _pixels(body["images"][0]) == plain
    finally:
        sdnext.client.txt2img(prompt="a fox", **SMALL)  # no LoRA in the prompt: SD.Next calls disable_lora


# --- bounded fuzz (issue 10): hostile values for every field, against our routes and SD.Next's generation -------
HUGE = 10**12
NAN, INF = float("nan"), float("inf")
TXT2IMG_VALUES = {
    "width": [0, -128, 100, 129, 500, 4096 * 8, HUGE, "abc", "256", 256.0, 256.5, None, True, [256]],
    "height": [-256, 500, HUGE, "x", None],
    "steps": [0, -1, 1, 10**6, HUGE, 2.5, "two"],
    "refiner_steps": [0, -1, 10**6, "x"],
    "cfg_scale": [-1, -5, 0, 1e30, NAN, INF, -INF, "high", 1e308],
    "cfg_image": [-1, -2, 1e30, NAN, "x"],
    "seed": [-1, -5, 2**64, 2**63, 1.5, "abc"],
    "batch_size": [2, 65, 1000, "x"],
    "sampler_name": ["", "DEIS", "Euler a", "UniPC", "\x1b[2J", "Default", None, 5, "a" * 10000],
    "override_settings": [{"cascade_compression": "x"}, {"cascade_compression": -5}, {"cascade_compression": NAN},
                          {"cascade_compression": 1e9}, {"cascade_decoder_sampler": "nope"},
                          {"cascade_prior_scheduler": "nope"}, {"cascade_prior_shift": NAN},
                          {"cascade_prior_shift": -1}, {"cascade_stage_a_scale": INF}, {"cascade_decoder_shift": "x"},
                          {"cascade_decoder_scheduler": 5}, "notadict", [1]],
    "extra": [{"cascade_compression": "x"}, {"cascade_compression": 0}, {"cascade_prior_shift": 1e300}, "x"],
}
# Inputs SD.Next itself answers with 500 before any extension code runs (exceptions in scripts' hooks and callbacks
# are caught and only logged by SD.Next, so an extension cannot refuse them): NaN/inf in an integer field (FastAPI's
# validation error cannot be JSON-encoded: "Out of range float values are not JSON compliant"), steps null
# (modules/processing_helpers.py calculate_base_steps: int(None)), batch_size or n_iter < 1 (modules/processing.py
# process_images_inner: p.all_seeds[0] of an empty list). Sent too, to check SD.Next still answers after them.
SDNEXT_OWN_500 = [{"width": NAN}, {"steps": NAN}, {"seed": NAN}, {"steps": None}, {"batch_size": 0},
                  {"batch_size": -1}, {"n_iter": 0}, {"n_iter": -1}]
PLAN_VALUES = {
    "width": ["-1", "0", str(HUGE), "nan", "inf", "abc", "1e3", "", "4096", "128", "1" * 5000],
    "height": ["-128", "nan", "9" * 23],
    "batch": ["0", "-1", str(10**9), "x", "64", "65"],
    "model": ["", "../../etc/passwd", "\x1b[2J", "a" * 3000, "tiny_sc_main"],
    "vram": ["", "1.2.3", "-1", "nan", "inf", "99999TB", "8GB", "0", "1e400"],
}
FUZZ_COMBINATIONS = 30  # random bodies mixing 2-4 fields of the table (seeded)


def _reason(body) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("errors") or "")
    return str(body or "")


def _fuzz_cases() -> list[tuple[str, str, object]]:
    cases = [("POST", "/sdapi/v1/txt2img", {**SMALL, "prompt": "a fox", key: value})
             for key, values in TXT2IMG_VALUES.items() for value in values]
    rng = random.Random(10)
    for _ in range(FUZZ_COMBINATIONS):
        keys = rng.sample(sorted(TXT2IMG_VALUES), rng.randint(2, 4))
        cases.append(("POST", "/sdapi/v1/txt2img", {**SMALL, "prompt": "a fox",
                                                     **{k: rng.choice(TXT2IMG_VALUES[k]) for k in keys}}))
    for key, value in (("denoising_strength", v) for v in (-1, 0, 2, NAN, "x")):
        cases.append(("POST", "/sdapi/v1/img2img", {**SMALL, "prompt": "a fox", key: value,
                                                     "init_images": [_png_gray()]}))
    cases += [("GET", f"/cascade/v1/plan?{urllib.parse.urlencode({k: v})}", None)
              for k, values in PLAN_VALUES.items() for v in values]
    cases += [("GET", "/cascade/v1/models?x=%00&width=nan", None), ("POST", "/cascade/v1/refresh", {"a": [NAN]}),
              ("GET", "/cascade/v1/backends?device=../../x", None)]
    return cases


def _png_gray() -> str:
    from PIL import Image

    return _png(Image.new("RGB", (128, 128), (128, 128, 128)))


def test_fuzz_fields_and_routes(sdnext):
    """Every case answers a 4xx with a reason or a 200 with images (never a 500, never a 200 without images), and
    SD.Next still answers and generates afterwards. The cases SD.Next fails itself (SDNEXT_OWN_500) are sent and
    reported, not asserted."""
    client = sdnext.client
    _select(client, MODEL)
    bad, counts = [], {}
    cases = _fuzz_cases()
    for method, path, body in cases:
        status, answer = client.call(method, path, body, timeout=120)
        counts[status] = counts.get(status, 0) + 1
        generation = path.startswith("/sdapi/")
        if status >= 500 or (400 <= status < 500 and not _reason(answer)):
            bad.append((path, body if generation else "", status, _reason(answer)[:200]))
        elif status == 200 and generation and not answer.get("images"):
            bad.append((path, body, status, "200 without images"))
    own = {}
    for fields in SDNEXT_OWN_500:
        status, answer = client.txt2img(**{**SMALL, **fields})
        own[json.dumps(fields)] = f"{status} {_reason(answer)[:80]}"
    print(f"\nfuzz: {len(cases)} cases, statuses {counts}; SD.Next's own failures: {own}")
    TIMINGS["fuzz_cases"] = len(cases) + len(SDNEXT_OWN_500)
    assert not bad, "\n".join(map(str, bad))
    assert client.get("/sdapi/v1/progress?skip_current_image=true")[0] == 200
    status, body = client.txt2img(**SMALL)
    assert status == 200 and len(body["images"]) == 1


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


def test_controlnet_by_name_in_extra(sdnext):
    """Issue 13: `extra.cascade_controlnets` with a ControlNet of `models/StableCascade/ControlNet` picked by name
    (canny edges computed from the photo) changes the image, deterministically, and the infotext records it; an
    unknown name is a 4xx that lists the known names; a path is refused."""
    from PIL import Image

    photo = Image.new("RGB", (256, 256), (20, 20, 20))
    photo.paste((230, 230, 230), (64, 64, 192, 192))
    item = {"model": "tiny_canny", "image": _png(photo), "canny": True, "strength": 0.8}
    plain = _pixels(sdnext.client.txt2img(prompt="a fox", **SMALL)[1]["images"][0])
    runs = [sdnext.client.txt2img(prompt="a fox", extra={"cascade_controlnets": [item]}, **SMALL) for _ in range(2)]
    assert all(status == 200 for status, _ in runs), runs
    controlled = [_pixels(body["images"][0]) for _, body in runs]
    assert controlled[0] == controlled[1] != plain
    assert "ControlNet: tiny_canny 0.8 0-1" in json.loads(runs[0][1]["info"])["infotexts"][0]
    status, body = sdnext.client.txt2img(prompt="a fox", extra={"cascade_controlnets": [{**item, "model": "nope"}]},
                                         **SMALL)
    assert 400 <= status < 500 and "no ControlNet named 'nope'" in _reason(body) and "tiny_canny" in _reason(body), body
    path = str(sdnext.data / "models" / "StableCascade" / "ControlNet" / "tiny_canny.safetensors")
    status, body = sdnext.client.txt2img(prompt="a fox", extra={"cascade_controlnets": [{**item, "model": path}]},
                                         **SMALL)
    assert 400 <= status < 500 and "looks like a path" in _reason(body), body
