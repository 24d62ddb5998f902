"""Running the app on uvicorn: in the foreground (`python -m cascade serve`) or on a background thread (tests,
benchmarks), always on one worker process — more processes means more replicas (serving.ray_serve)."""

from __future__ import annotations

import sys
import threading
import time

from cascade.errors import CascadeError

from .config import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _uvicorn_config(app, host: str, port: int, quiet: bool):
    import uvicorn

    # One process, one event loop; keep-alive as uvicorn's default. `timeout_graceful_shutdown` bounds a shutdown
    # that waits on a long generation (the worker stops it at its next step anyway).
    return uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet,
                          timeout_graceful_shutdown=10, lifespan="on")


def serve_forever(config: ServeConfig, host: str, port: int, quiet: bool = False) -> int:
    """Load the model, then answer on host:port until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    from .app import create_app

    if host not in LOOPBACK and not config.auth_enabled:
        print(f"warning: listening on {host} without --api-auth/--api-token: anyone who can reach this port can "
              "use the server", file=sys.stderr)
    app = create_app(config)
    worker = app.state.worker
    model = worker.entry
    print(f"model: {model.name} ({model.source}); queue {config.queue_size}, timeout {config.timeout_s:g} s",
          file=sys.stderr)
    print(f"serving the SD.Next API on http://{host}:{port}/sdapi/v1/ (health: /healthz, metrics: /metrics)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(_uvicorn_config(app, host, port, quiet))
    try:
        server.run()
    finally:
        worker.stop()
    if not server.started:
        raise CascadeError(f"could not listen on {host}:{port} (in use, or not an address of this machine); "
                           "choose another --port or --host")
    return 0


class BackgroundServer:
    """A live uvicorn on a thread of this process (tests and benchmarks): `with BackgroundServer(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, quiet: bool = True):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(_uvicorn_config(app, self.host, self.port, quiet))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` now (a race with other processes is possible; tests retry)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
