"""Ray: the API as a Ray Serve deployment with 2 CPU replicas, and batch jobs on Ray actors.

A local Ray instance is started by the module (`ray.init` on this machine only, no dashboard) and shut down at its
end. Part of the default suite (45 s on a quiet 2-core machine, 60-98 s on a busy one: Ray and Serve start-up, 2
replicas and the batch actors each loading the model); CASCADE_TEST_RAY=0 skips it, and it is skipped with the
reason printed where Ray is not installed (`python install.py --serve`).
Every wait is bounded; the requests use the tiny model at 128x128.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

if os.environ.get("CASCADE_TEST_RAY") == "0":
    pytest.skip("Ray Serve / Ray batch tests switched off with CASCADE_TEST_RAY=0", allow_module_level=True)
pytest.importorskip("ray", reason="ray is not installed (python install.py --serve installs requirements-serve.txt)")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed (python install.py --serve)")
pytest.importorskip("fastapi", reason="fastapi is not installed (python install.py --serve)")

from test_serve import SMALL, _jobs, call, decode_png, manifest, txt2img, wait_until  # noqa: E402

# Long enough to be mid-generation when a replica is killed (~10 s on one CPU thread), never run to the end.
LONG = {"prompt": "a long one", "width": 128, "height": 128, "steps": 1000, "refiner_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with 4 logical CPUs: 2 Serve replicas + 2 batch actors (each takes 1)."""
    from cascade.session import PipelineSpec, resolve_paths
    from serving.config import ServeConfig
    from serving.ray_serve import connect

    resolve_paths(PipelineSpec())  # the tiny checkpoints, written once before the replicas read them
    os.environ["OMP_NUM_THREADS"] = "1"  # runtime_env passes it on: replicas share this machine's cores
    config = ServeConfig(device="cpu", queue_size=0, timeout_s=60, torch_threads=1)
    ray = connect("local", config, num_cpus=4)
    yield ray, config
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def deployment(ray_local):
    """`serve --ray --replicas 2` on the local Ray; queue 0: a busy replica answers 503 to another generation."""
    from serving.ray_serve import deploy
    from serving.server import free_port

    _, config = ray_local
    port = free_port()
    deploy(config, host="127.0.0.1", port=port, replicas=2, blocking=False)
    return f"http://127.0.0.1:{port}"


def worker_of(headers: dict) -> int:
    return int(headers["x-cascade-worker"].rsplit(":", 1)[1])


def retrying(url: str, body: dict, tries: int = 40):
    """A client that honours 503 + Retry-After (shortened): with queue 0 both replicas may be busy at once."""
    for _ in range(tries):
        status, headers, answer = txt2img(url, body)
        if status != 503:
            return status, headers, answer
        assert int(headers["retry-after"]) >= 1
        time.sleep(0.05)
    raise AssertionError(f"503 {tries} times in a row")


@pytest.fixture(scope="module")
def replica_pids(deployment):
    """Both replicas' processes, from the worker header of concurrent answers."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: retrying(deployment, {"prompt": "a", "seed": seed, **SMALL}), range(8)))
    assert all(status == 200 for status, _, _ in answers), [a[2] for a in answers if a[0] != 200]
    return {worker_of(headers) for _, headers, _ in answers}


def test_concurrent_requests_spread_over_both_replicas(deployment, replica_pids):
    assert len(replica_pids) == 2, replica_pids  # both replicas answered
    # Replicas are stateless: one body gives one image, whichever replica made it.
    images = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for status, headers, body in pool.map(lambda _: retrying(deployment, {"prompt": "b", "seed": 3, **SMALL}),
                                              range(6)):
            assert status == 200
            images.setdefault(worker_of(headers), np.asarray(decode_png(body["images"][0])))
    first, *others = images.values()
    for other in others:
        np.testing.assert_array_equal(first, other)


def test_progress_and_interrupt_by_id_reach_the_replica_running_the_task(deployment, replica_pids):
    """The proxy sends a poll to the less busy replica, which is not the one generating: it answers from the
    replicas' shared TaskBoard, and an interrupt by id sent anywhere stops the task on its own replica."""
    url = deployment
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("far", txt2img(url, {**LONG, "force_task_id": "far"},
                                                                             timeout=90)))
    thread.start()

    def progressed():
        assert "far" not in result, result["far"][::2]  # it must still be running
        status, _, answer = call(url, "GET", "/sdapi/v1/progress?id_task=far&skip_current_image=true")
        return answer if status == 200 and answer["progress"] > 0 else None

    seen = wait_until(progressed, 30, "progress of the task")
    assert seen["id"] == "far" and seen["state"]["status"] == "running" and seen["state"]["sampling_step"] > 0
    status, headers, _ = retrying(url, {"prompt": "probe", **SMALL})  # answered by the other replica
    assert status == 200
    assert call(url, "POST", "/sdapi/v1/interrupt?id_task=far")[0] == 204
    thread.join(30)
    assert not thread.is_alive(), "the interrupted request did not return"
    status, _, body = result["far"]
    assert status == 409 and body["error"] == "Interrupted", body
    assert call(url, "POST", "/sdapi/v1/interrupt?id_task=nobody")[0] == 404


def test_killing_a_replica_mid_request_fails_that_request_cleanly_and_recovers(deployment, replica_pids):
    url = deployment
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("a", txt2img(url, LONG, timeout=90)))
    thread.start()
    # Serve routes to the less loaded replica: the idle one answers a short request; the busy one is the other.
    time.sleep(1.0)
    status, headers, _ = retrying(url, {"prompt": "probe", **SMALL})
    idle = worker_of(headers)
    (victim,) = replica_pids - {idle}
    assert "a" not in result, result  # still running
    assert victim != idle
    os.kill(victim, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the request on the killed replica hung"
    status, _, body = result["a"]
    assert 500 <= status < 600, (status, body)  # a clean server error, not a hang and not a 200 without images

    status, headers, body = txt2img(url, {"prompt": "next", **SMALL})
    assert status == 200 and worker_of(headers) == idle, (status, body)

    # The controller replaces the dead replica by itself: a new process answers.
    def two_workers():
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: txt2img(url, {"prompt": "after", **SMALL}), range(6)))
        seen = {worker_of(headers) for status, headers, _ in answers if status == 200}
        return len(seen) == 2 and victim not in seen

    wait_until(two_workers, 90, "a replacement replica")


def test_batch_on_ray_actors_resumes_with_every_image_once(ray_local, tmp_path):
    from cascade.api_fields import from_sdnext
    from serving.batch import Renderer, Unit, run_batch_jobs

    _, config = ray_local
    jobs, out, said = _jobs(tmp_path / "jobs.jsonl"), tmp_path / "out", []
    first = run_batch_jobs(jobs, out, config, ray_address="local", workers=2, quiet=True, stop_after=3,
                           report=said.append)
    assert first.made == 3 and first.bad_lines == 2 and not first.failed
    (out / "000005-000.png").write_bytes(b"half")  # a PNG written, its record not: redone
    with open(out / "results.jsonl", "a") as f:
        f.write('{"line": 5, "ind')  # a torn record
    second = run_batch_jobs(jobs, out, config, ray_address="local", workers=2, quiet=True, report=said.append)
    assert second.skipped == 3 and second.made == 2 and not second.failed
    records = manifest(out)
    assert sorted((r["line"], r["index"]) for r in records) == [(1, 0), (1, 1), (3, 0), (5, 0), (5, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in records] + ["results.jsonl"])
    assert len({r["worker"] for r in records}) >= 2  # the actors shared the work (new actors on the re-run)
    # An actor's image is the in-process renderer's image for the same unit (line 5, image 1: seed 9 + 1).
    record = next(r for r in records if (r["line"], r["index"]) == (5, 1))
    fields = from_sdnext(json.loads(jobs.read_text().splitlines()[4])).iteration(1)
    local = Renderer(config).render(Unit(5, 1, {**fields, "batch_size": 1}, None))
    assert local["seed"] == record["seed"] == 10
    np.testing.assert_array_equal(np.asarray(Image.open(out / record["file"])),
                                  np.asarray(Image.open(io.BytesIO(local["png"]))))
