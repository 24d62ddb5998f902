"""Benchmark (issue #14): the HTTP API and its Ray Serve deployment under load, on the tiny model, CPU.

What is measured (every figure is a ratio against a baseline measured in the same run, or a count)
    (api)     the standalone server (`python -m serving serve`, its own process, 1 torch thread) answering
              txt2img at 128x128 (4 prior + 2 decoder steps) from a bounded thread-pool client (stdlib
              http.client) at 1, 4 and 16 concurrent clients: images/s, p50/p95 latency, errors (the queue, 32,
              is above 16 clients, so there must be none). Throughput is bounded by the one worker: more clients
              wait longer, they do not get more images per second.
    (memory)  the server's RSS (/proc/PID/status VmRSS) after a warm-up and after 500 requests: growth <= 5 %.
    (overhead) API latency at 1 client vs the same generation called directly in this process (open_pipeline +
              generate + PNG with infotext, 1 thread), interleaved pair by pair: the cost of HTTP, JSON, the
              queue and base64.
    (ray)     the same app on Ray Serve (local Ray, CPU replicas of 1 thread each): images/s at 4 clients with
              1 replica, 2 replicas, then 1 again (scaling = 2-replica / mean of the 1-replica runs); and the
              request-path overhead of Serve (proxy + router + replica) vs the bare server, one request to each
              in turn at 1 client (median of per-pair ratios).

Why
    Issue 14's targets: 0 errors below the queue limit, no RSS growth past 5 % over 500 requests, scaling over
    replicas, and a Serve request path that costs little next to a generation.

Machine note: a shared 2-core VM; 2 replicas of 1 thread each can at best double throughput, and other processes
on it take cores at random, so absolute times are noisy; ratios come from interleaved or adjacent runs.

Run from the repo root:  python benchmarks/serve.py [--no-ray] [--requests 500]   (about 3-4 minutes here)
Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BODY = {"prompt": "a lighthouse at dusk", "width": 128, "height": 128, "steps": 4, "refiner_steps": 2}
LEVELS = (1, 4, 16)
QUEUE = 32


# --- a bounded client ---------------------------------------------------------------------------------------------
def post(port: int, body: dict, timeout: float = 120.0, workers: set | None = None) -> tuple[int, float]:
    """One txt2img: (status, seconds). A 200 must carry an image. `workers` collects the answering processes."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/sdapi/v1/txt2img", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        status = resp.status
        if status == 200 and not json.loads(raw)["images"]:
            status = -1  # a 200 with no image counts as an error
        if workers is not None and resp.getheader("X-Cascade-Worker"):
            workers.add(resp.getheader("X-Cascade-Worker"))
    except OSError:
        status = -2
    finally:
        conn.close()
    return status, time.perf_counter() - t0


def load(port: int, clients: int, requests: int, seed0: int = 0) -> dict:
    """`requests` txt2img over `clients` concurrent connections; throughput and latency percentiles."""
    t0 = time.perf_counter()
    workers: set = set()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: post(port, {**BODY, "seed": seed0 + i}, workers=workers), range(requests)))
    wall = time.perf_counter() - t0
    ok = sorted(s for status, s in results if status == 200)
    errors = {}
    for status, _ in results:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    q = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [float("nan")] * 19
    return {"clients": clients, "requests": requests, "ok": len(ok), "errors": errors, "workers": len(workers),
            "wall_s": round(wall, 3),
            "images_per_s": round(len(ok) / wall, 3), "p50_s": round(statistics.median(ok), 4) if ok else None,
            "p95_s": round(q[18], 4)}


# --- the standalone server ----------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_server(port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--port", str(port), "--device", "cpu",
                             "--threads", "1", "--queue-size", str(QUEUE), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def direct_vs_api(port: int, pairs: int) -> dict:
    """The same generation in this process (the engine's one entry) vs through the API, alternating."""
    import torch

    from cascade.api_fields import from_sdnext
    from cascade.pipeline import to_pil
    from cascade.request import build_request
    from cascade.session import PipelineSpec, open_pipeline
    from serving.render import infotexts_for, png_bytes

    torch.set_num_threads(1)
    session = open_pipeline(PipelineSpec(device="cpu"))
    names = session.model_names()

    def direct(seed: int) -> float:
        t0 = time.perf_counter()
        request = build_request(from_sdnext({**BODY, "seed": seed}).fields)
        result = session.pipeline.generate(request)
        base64.b64encode(png_bytes(to_pil(result.images)[0], infotexts_for(result, names)[0]))
        return time.perf_counter() - t0

    direct(0), post(port, {**BODY, "seed": 0})  # warm both
    d, a, ratios = [], [], []
    for i in range(pairs):
        first_direct = i % 2 == 0
        x = direct(i) if first_direct else None
        status, y = post(port, {**BODY, "seed": i})
        if not first_direct:
            x = direct(i)
        if status == 200:
            d.append(x), a.append(y), ratios.append(y / x)
    del session
    return {"pairs": len(ratios), "direct_p50_s": round(statistics.median(d), 4),
            "api_p50_s": round(statistics.median(a), 4), "api_over_direct": round(statistics.median(ratios), 3),
            "api_overhead_ms": round((statistics.median(a) - statistics.median(d)) * 1000, 1)}


# --- Ray Serve ----------------------------------------------------------------------------------------------------
def ray_part(bare_port: int, requests: int, pairs: int) -> dict:
    from ray import serve

    from serving.config import ServeConfig
    from serving.ray_serve import APP_NAME, build_deployment, connect
    from serving.server import free_port

    config = ServeConfig(device="cpu", queue_size=8, torch_threads=1)
    t0 = time.monotonic()
    ray = connect("local", config, num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out: dict = {"ray": ray.__version__, "runs": []}

    def deploy(replicas: int) -> float:
        t = time.monotonic()
        serve.run(build_deployment(config, replicas), name=APP_NAME, route_prefix="/")
        seconds = time.monotonic() - t
        time.sleep(3)  # a replica being scaled away finishes draining
        load(port, replicas, 4 * replicas)  # warm every replica
        return seconds

    out["start_s"] = round(time.monotonic() - t0, 1)
    for replicas in (1, 2, 1):
        seconds = deploy(replicas)
        run = load(port, 4, requests, seed0=1000 * replicas)
        out["runs"].append({"replicas": replicas, "deploy_s": round(seconds, 1), **run})
        if replicas == 1 and "serve_vs_bare" not in out:
            ratios, serve_s, bare_s = [], [], []
            for i in range(3):
                post(port, {**BODY, "seed": i}), post(bare_port, {**BODY, "seed": i})  # warm both paths
            for i in range(pairs):
                order = (port, bare_port) if i % 2 == 0 else (bare_port, port)
                times = {p: post(p, {**BODY, "seed": i}) for p in order}
                if all(status == 200 for status, _ in times.values()):
                    serve_s.append(times[port][1]), bare_s.append(times[bare_port][1])
                    ratios.append(times[port][1] / times[bare_port][1])
            out["serve_vs_bare"] = {"pairs": len(ratios), "serve_p50_s": round(statistics.median(serve_s), 4),
                                    "bare_p50_s": round(statistics.median(bare_s), 4),
                                    "serve_over_bare": round(statistics.median(ratios), 3),
                                    "serve_overhead_ms": round((statistics.median(serve_s)
                                                                - statistics.median(bare_s)) * 1000, 1)}
    one = [r["images_per_s"] for r in out["runs"] if r["replicas"] == 1]
    two = [r["images_per_s"] for r in out["runs"] if r["replicas"] == 2]
    out["scaling_2_over_1"] = round(statistics.mean(two) / statistics.mean(one), 3)
    serve.shutdown()
    ray.shutdown()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="requests between the two RSS readings")
    parser.add_argument("--pairs", type=int, default=30, help="interleaved pairs for the overhead ratios")
    parser.add_argument("--ray-requests", type=int, default=48, help="requests per Ray replica-count run")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args()

    from serving.server import free_port

    cache = tempfile.mkdtemp(prefix="cascade-bench-")
    os.environ.setdefault("CASCADE_CACHE_DIR", cache)
    os.environ["OMP_NUM_THREADS"] = "1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    server = start_server(port, env)
    report: dict = {"benchmark": "serve", "issue": 14, "body": BODY, "queue_size": QUEUE,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "processor": platform.processor() or platform.machine()}}
    try:
        load(port, 1, 10)  # warm-up: first requests compile kernels, fill caches
        before = rss_bytes(server.pid)
        shares = [max(1, args.requests * w // sum((1, 4, 16))) for w in (1, 4, 16)]
        shares[-1] = args.requests - sum(shares[:-1])
        report["api"] = [load(port, clients, n, seed0=10_000 * clients) for clients, n in zip(LEVELS, shares)]
        after = rss_bytes(server.pid)
        report["memory"] = {"requests": sum(shares), "rss_before_mib": round(before / 2 ** 20, 1),
                            "rss_after_mib": round(after / 2 ** 20, 1), "growth": round(after / before - 1, 4)}
        base = report["api"][0]["images_per_s"]
        for row in report["api"]:
            row["throughput_vs_1_client"] = round(row["images_per_s"] / base, 3)
        report["overhead"] = direct_vs_api(port, args.pairs)
        if not args.no_ray:
            report["ray"] = ray_part(port, args.ray_requests, args.pairs)
    finally:
        server.terminate()
        server.wait(30)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
