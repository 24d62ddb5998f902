"""Serving the engine without SD.Next: an HTTP API that SD.Next/A1111 clients already speak, Ray Serve replicas, and
batch jobs from a JSONL file.

The only code of the repo that imports fastapi, uvicorn, prometheus_client and ray (all optional: `python install.py
--serve` installs requirements-serve.txt). It uses the engine exactly as the CLI and the SD.Next extension do: one
pipeline from `cascade.session.open_pipeline`, requests from `cascade.api_fields.from_sdnext` +
`cascade.request.build_request`, PNGs with `cascade.infotext`.

Modules: `config` (what a server is started with), `errors` (failures -> HTTP status and SD.Next's error JSON),
`catalog` (models by name, from the configured folder only), `worker` (one loaded pipeline, a bounded queue, progress,
cancellation), `render` (images -> base64 PNGs with infotext, SD.Next's `info`), `metrics` (Prometheus), `app` (the
FastAPI app), `server` (uvicorn), `ray_serve` (the same app as a Ray Serve deployment), `batch` (JSONL jobs, local
or on Ray actors), `cli` (the `serve` and `batch` subcommands).
"""
