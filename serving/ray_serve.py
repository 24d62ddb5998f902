"""The same app as a Ray Serve deployment: one replica per GPU (CPU replicas where the cluster has none).

Each replica is a Ray actor that builds `serving.app.create_app(config)` itself (serve.ingress with a builder), so it
opens its own pipeline from paths every node must see (a shared or replicated model folder) and holds nothing another
replica needs: replicas are stateless, the Serve controller restarts a dead one, and its proxy routes around it.
What bounds a replica's work is the same bounded queue as the standalone server: a replica whose queue is full
answers 503 + Retry-After itself (SD.Next's error JSON). Serve counts every request, progress polls included, against
`max_ongoing_requests`, so that is queue_size + 1 (the running one) + CONTROL_SLOTS: a replica busy generating still
answers /progress and /interrupt. Past that, requests wait at the proxy (`max_queued_requests`), and past that Serve
answers 503 with Retry-After itself (plain text). Autoscaling (`--autoscale MIN:MAX`) targets the queue length:
Serve adds a replica when the requests ongoing per replica stay above `target_ongoing_requests`.

A replica that dies mid-request costs that request a 5xx from the proxy (never a hang); the controller starts a new
one and the proxy routes to the others meanwhile. /progress and /interrupt reach one replica chosen by the proxy,
so the replicas publish their tasks' progress on a small named actor (TaskBoard) every 0.25 s and pick up the
interrupts meant for them from it: a task is found by id on any replica. /metrics is the answering replica's.

`python -m cascade serve --ray [--address auto] --replicas N` deploys it; `serve run serving/serve.yaml` does the
same from the documented config (`build_app` reads the yaml's `args`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError

from .config import ServeConfig

APP_NAME = "cascade"
DEPLOYMENT_NAME = "StableCascade"
REPO_ROOT = str(Path(__file__).resolve().parents[1])
CONTROL_SLOTS = 4  # requests beyond the generation queue a replica takes at once: progress, interrupt, options
RETRY_AFTER_S = 5  # Serve's own 503 (its proxy queue full) cannot know the job time; the replica's 503 does


def require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise CascadeError("Ray Serve is not installed: run `python install.py --serve` (requirements-serve.txt)") from None
    return ray, serve


class TaskBoard:
    """Which replica has each task, and its latest progress: one small named actor per application, so /progress
    and /interrupt by id work on whichever replica the proxy picks. Holds no images and no request bodies."""

    KEEP_S = 900.0  # a finished task's progress is kept this long
    MAX_TASKS = 4096

    def __init__(self) -> None:
        self.tasks: dict[str, tuple[str, dict, float]] = {}  # id -> (replica, progress payload, time)
        self.stops: dict[str, set[str]] = {}  # replica -> task ids to interrupt

    def publish(self, replica: str, snapshots: dict) -> None:
        import time

        now = time.monotonic()
        for task_id, payload in snapshots.items():
            self.tasks[task_id] = (replica, payload, now)
        if len(self.tasks) > self.MAX_TASKS:
            for task_id in [t for t, (_, _, at) in self.tasks.items() if now - at > self.KEEP_S]:
                del self.tasks[task_id]

    def progress(self, task_id: str) -> dict | None:
        entry = self.tasks.get(task_id)
        return entry[1] if entry else None

    def interrupt(self, task_id: str) -> bool:
        entry = self.tasks.get(task_id)
        if entry is None:
            return False
        self.stops.setdefault(entry[0], set()).add(task_id)
        return True

    def take_stops(self, replica: str) -> list[str]:
        return sorted(self.stops.pop(replica, ()))


class SharedTasks:
    """The app's view of the TaskBoard from one replica (the interface serving.app.create_app takes as `tasks`)."""

    def __init__(self, board, replica: str):
        self.board, self.replica = board, replica

    async def publish(self, snapshots: dict) -> None:
        await self.board.publish.remote(self.replica, snapshots)

    async def progress(self, task_id: str) -> dict | None:
        return await self.board.progress.remote(task_id)

    async def interrupt(self, task_id: str) -> bool:
        return await self.board.interrupt.remote(task_id)

    async def take_stops(self) -> list[str]:
        return await self.board.take_stops.remote(self.replica)


def task_board(app_name: str = APP_NAME):
    """The application's TaskBoard actor, created by the first replica that asks (no CPU or GPU reserved)."""
    import ray

    return ray.remote(num_cpus=0)(TaskBoard).options(name=f"{app_name}-tasks", namespace="cascade",
                                                     get_if_exists=True, lifetime="detached").remote()


def replica_app(config: ServeConfig):
    """Built on each replica: its own worker and pipeline, sharing its tasks on the TaskBoard. Tagged with the
    replica id for /healthz."""
    from ray import serve

    from .app import create_app

    try:
        context = serve.get_replica_context()
        tag, app_name = context.replica_id.unique_id, context.app_name
    except Exception:  # noqa: BLE001 - outside a replica (a unit test calling the builder)
        return create_app(replace(config, tags={**config.tags, "replica": "local"}))
    tasks = SharedTasks(task_board(app_name), str(tag))
    return create_app(replace(config, tags={**config.tags, "replica": str(tag)}), tasks=tasks)


def deployment_options(config: ServeConfig, replicas: int | None, autoscale: tuple[int, int] | None,
                       gpus: float) -> dict[str, Any]:
    """Serve options: one GPU per replica where the cluster has GPUs, else one CPU; the queue bounds of the app."""
    actor: dict[str, Any] = {"num_gpus": 1} if gpus > 0 else {"num_cpus": 1}
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": config.queue_size + 1 + CONTROL_SLOTS,
        "max_queued_requests": max(1, config.queue_size),
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 10,
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1, config.queue_size // 2),
                                         "upscale_delay_s": 10, "downscale_delay_s": 120}
    else:
        options["num_replicas"] = replicas or 1
    return options


def build_deployment(config: ServeConfig, replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
                     gpus: float = 0.0):
    """A bound Serve application running `replica_app(config)` on every replica."""
    _, serve = require_ray()

    class StableCascadeReplica:
        """Routes come from the FastAPI app built on the replica (serving.app); Serve's health check asks the
        replica's worker, so a replica whose worker thread died is replaced by the controller."""

        def __init__(self, config: ServeConfig):
            self.config = config
            self.cascade_app = None

        def __serve_build_asgi_app__(self):  # Serve's late-bound ingress: called once on the replica, after __init__
            self.cascade_app = replica_app(self.config)
            return self.cascade_app

        def check_health(self) -> None:
            if self.cascade_app is not None and not self.cascade_app.state.worker.alive:
                raise RuntimeError("the replica's generation worker is not running")

    ingress = serve.ingress()(StableCascadeReplica)
    return serve.deployment(**deployment_options(config, replicas, autoscale, gpus))(ingress).bind(config)


def runtime_env(config: ServeConfig) -> dict[str, Any]:
    """What every Ray worker process needs: this repo importable, the cache folder, no hub access, one thread per
    CPU replica (replicas share the node's cores)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("CASCADE_CACHE_DIR", "OMP_NUM_THREADS"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {"env_vars": env}


def connect(address: str | None, config: ServeConfig, num_cpus: int | None = None):
    """Join a cluster (`auto`, `ray://...`, host:port), or start a local one bound to loopback (`local`/None)."""
    ray, _ = require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network
    if ray.is_initialized():
        return ray
    if address in (None, "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env(config), log_to_driver=False, object_store_memory=256 * 1024 * 1024)
    else:
        ray.init(address=address, runtime_env=runtime_env(config), log_to_driver=False)
    return ray


def cluster_gpus() -> float:
    ray, _ = require_ray()
    return float(ray.cluster_resources().get("GPU", 0))


def deploy(config: ServeConfig, *, host: str, port: int, replicas: int | None = 1,
           autoscale: tuple[int, int] | None = None, address: str | None = None, blocking: bool = True):
    """Deploy on Ray and (by default) block until interrupted. Returns the app handle when not blocking."""
    _, serve = require_ray()
    connect(address, config)
    serve.start(http_options={"host": host, "port": port})
    gpus = cluster_gpus()
    app = build_deployment(config, replicas, autoscale, gpus)
    kind = "GPU" if gpus else "CPU"
    count = f"{autoscale[0]}-{autoscale[1]} (autoscaling)" if autoscale else str(replicas)
    print(f"Ray Serve: {count} {kind} replica(s); SD.Next API on http://{host}:{port}/sdapi/v1/", file=sys.stderr,
          flush=True)
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)
    return handle


def build_app(args: dict[str, Any]):
    """`serve run serving/serve.yaml`: the application from the yaml's `args` (ServeConfig fields plus `replicas`,
    `autoscale: "MIN:MAX"`)."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    autoscale = parse_autoscale(args.pop("autoscale", None))
    if "api_auth" in args:
        from .config import parse_api_auth

        args["api_auth"] = parse_api_auth(args["api_auth"])
    if "api_tokens" in args:
        args["api_tokens"] = tuple(args["api_tokens"])
    config = ServeConfig(**args)
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    return build_deployment(config, replicas, autoscale, gpus)


def parse_autoscale(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    low, sep, high = str(value).partition(":")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise CascadeError(f"--autoscale {value!r} must be MIN:MAX replicas, e.g. 1:4")
    return bounds
