"""Prometheus metrics of one server process (GET /metrics, text format 0.0.4).

Each `Metrics` has its own registry, so several apps in one process (tests, Ray replicas sharing a worker process)
never collide; Ray Serve's own metrics (replica and proxy) come from Ray's exporter, not from here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cascade_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("cascade_request_seconds", "Time to answer a generation request",
                                         ["endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_length = Gauge("cascade_queue_length", "Requests waiting for the worker", registry=r)
        self.running = Gauge("cascade_running", "Requests being generated now (0 or 1)", registry=r)
        self.step_seconds = Histogram("cascade_step_seconds", "Time of one sampling step", ["stage"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.job_seconds = Histogram("cascade_job_seconds", "Time a generation ran on the worker",
                                     buckets=REQUEST_BUCKETS, registry=r)
        self.load_seconds = Histogram("cascade_model_load_seconds", "Time to open a pipeline", buckets=REQUEST_BUCKETS,
                                      registry=r)
        self.images = Counter("cascade_images", "Images generated", registry=r)
        self.errors = Counter("cascade_errors", "Requests that failed, by HTTP status", ["status"], registry=r)
        self.rejected = Counter("cascade_queue_rejected", "Requests refused because the queue was full", registry=r)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
