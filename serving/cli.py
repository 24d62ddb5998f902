"""The `serve` and `batch` subcommands. cascade/cli.py registers them and imports this module only when one of them
runs, so the engine never imports the serving packages; `python -m serving` runs the same two commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cascade.errors import CascadeError

from .config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig, parse_api_auth

TINY_NOTICE = ("No --prior/--decoder given: using the embedded TINY model with RANDOM weights (for testing; the "
               "images are noise-like). Pass --prior MAIN.safetensors --decoder DECODER.safetensors for real images.")
SERVE_HINT = "the serving packages are missing: run `python install.py --serve` (installs requirements-serve.txt)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior", help="Stage C file of the default model (the 'main' file)")
    p.add_argument("--decoder", help="Stage B file of the default model (the 'decoder' file)")
    p.add_argument("--text-encoder", help="CLIP-G file when the prior file has none")
    p.add_argument("--stage-a", help="Stage A file when the decoder file has none")
    p.add_argument("--models-dir", help="folder of more models, chosen per request by name (sd_model_checkpoint); "
                                        "on Ray, a path every node sees")
    p.add_argument("--device", default=None, help="auto, cpu, cuda[:N], rocm, xpu, mps, openvino[:DEVICE]")
    p.add_argument("--dtype", default="auto", help="UNet dtype: auto, bf16, fp16, fp32")
    p.add_argument("--offload", default="auto", help="memory plan: auto, resident, stage, stream, sequential")
    p.add_argument("--vram", default=None, help="memory budget for the plan, e.g. 16GiB")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no access log / progress bar")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="HTTP server speaking the SD.Next API (optionally on Ray Serve)",
                       description="Serve the SD.Next/A1111 API subset (txt2img, img2img, progress, interrupt, "
                                   "sd-models, options) plus /healthz and /metrics.")
    _add_model_args(s)
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}, this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--queue-size", type=int, default=8, help="requests waiting behind the running one; more get 503")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queue wait included (504)")
    s.add_argument("--api-auth", default=None, help="user:password[,user2:password2] for HTTP Basic (SD.Next's flag)")
    s.add_argument("--api-token", action="append", default=[], help="a Bearer token that is accepted (repeatable)")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (base64 images included)")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (request size, init image)")
    s.add_argument("--max-images", type=int, default=16, help="most images per request (batch_size x n_iter)")
    s.add_argument("--max-prompt-chars", type=int, default=20000, help="longest prompt / negative prompt")
    s.add_argument("--ray", action="store_true", help="deploy on Ray Serve (one replica per GPU, CPU replicas if none)")
    s.add_argument("--address", default=None, help="Ray cluster address (auto, ray://HOST:10001); default: a local Ray")
    s.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (fixed)")
    s.add_argument("--autoscale", default=None, help="Ray Serve autoscaling MIN:MAX replicas on queue length")
    return s


def add_batch_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("batch", help="render a JSONL file of API requests into PNGs (resumable)",
                       description="Each line is one request in the API's JSON; one PNG per image, results.jsonl.")
    b.add_argument("jobs", help="JSONL file: one SD.Next txt2img request per line")
    b.add_argument("--out", required=True, help="output folder (PNGs and results.jsonl); re-run to resume")
    _add_model_args(b)
    b.add_argument("--ray", default=None, metavar="ADDRESS", help="run on Ray: local (start one here), auto, or an address")
    b.add_argument("--workers", type=int, default=1, help="Ray actors, each with the model loaded (one GPU each)")
    return b


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        prior=args.prior, decoder=args.decoder, text_encoder=args.text_encoder, stage_a=args.stage_a,
        models_dir=args.models_dir, device=args.device, dtype=args.dtype, offload=args.offload, vram=args.vram,
        queue_size=getattr(args, "queue_size", 8), timeout_s=getattr(args, "timeout", 600.0),
        api_auth=parse_api_auth(getattr(args, "api_auth", None)), api_tokens=tuple(getattr(args, "api_token", ())),
        max_body_bytes=int(getattr(args, "max_body_mb", 32.0) * 1024 * 1024),
        max_image_pixels=getattr(args, "max_image_pixels", 4096 * 4096), max_images=getattr(args, "max_images", 16),
        max_prompt_chars=getattr(args, "max_prompt_chars", 20000),
        torch_threads=args.threads,
    )


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CascadeError(f"{SERVE_HINT} (not importable: {', '.join(missing)})")


def run_serve(args: argparse.Namespace) -> int:
    """`serve`: the standalone server, or with --ray the Ray Serve deployment. Blocks until interrupted."""
    _require("fastapi", "uvicorn", "prometheus_client", *(["ray"] if args.ray else []))
    config = config_from_args(args)
    if not args.prior:
        print(TINY_NOTICE, file=sys.stderr)
    if args.ray:
        from .ray_serve import deploy, parse_autoscale

        deploy(config, host=args.host, port=args.port, replicas=args.replicas, autoscale=parse_autoscale(args.autoscale),
               address=args.address, blocking=True)
        return 0
    from .server import serve_forever

    return serve_forever(config, args.host, args.port, quiet=args.quiet)


def run_batch(args: argparse.Namespace) -> int:
    """`batch`: 0 when every line made all its images, 2 when a line was bad or an image failed (each reported)."""
    if args.ray:
        _require("ray")
    if args.workers < 1:
        raise CascadeError(f"--workers {args.workers} must be at least 1")
    if args.workers > 1 and not args.ray:
        raise CascadeError("--workers needs --ray (local, auto or an address): in one process a model runs one "
                           "image at a time")
    config = config_from_args(args)
    if not args.prior:
        print(TINY_NOTICE, file=sys.stderr)
    from .batch import run_batch_jobs

    report = run_batch_jobs(Path(args.jobs), Path(args.out), config, ray_address=args.ray, workers=args.workers,
                            quiet=args.quiet)
    print(f"{report.made} images made, {report.skipped} already done, {report.bad_lines} bad lines, "
          f"{report.failed} failed, in {report.seconds:.1f} s -> {args.out}", file=sys.stderr)
    return 0 if report.ok else 2


def main(argv: list[str] | None = None) -> int:
    """`python -m serving serve|batch ...` (the same commands as `python -m cascade serve|batch`)."""
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve Stable Cascade / run batch jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_batch_parser(sub)
    args = parser.parse_args(argv)
    try:
        return (run_serve if args.command == "serve" else run_batch)(args)
    except CascadeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished images are kept (re-run to resume)", file=sys.stderr)
        return 130
