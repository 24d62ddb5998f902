"""The extension's API: /cascade/v1/models, /refresh, /backends, /plan. Files are only read inside the model folder."""

from __future__ import annotations

import logging
from typing import Any, Callable

from cascade.errors import CascadeError

from . import library, options
from .errors import CascadeHostError, log_line, response_body

log = logging.getLogger(__name__)

PREFIX = "/cascade/v1"


def _loaded_title() -> str | None:
    from modules import shared

    info = getattr(shared.sd_model, "sd_checkpoint_info", None) if shared.sd_loaded else None
    return getattr(info, "title", None)


def models_json(lib: library.Library) -> dict[str, Any]:
    """The folder's pairs (with the title SD.Next lists them under) and what each file is."""
    out = lib.as_json()
    from modules import shared

    loaded = _loaded_title()
    model = shared.sd_model if loaded else None
    for pair in out["pairs"]:
        pair["title"] = f"Diffusers/{pair['name']}"
        pair["loaded"] = pair["title"] == loaded
        if pair["loaded"]:
            engine = getattr(model, "_engine", None)
            error = getattr(model, "load_error", None)
            pair["memory"] = getattr(getattr(engine, "placement", None), "name", None)
            pair["load_error"] = str(error) if error is not None else None
    out["diffusers_dir"] = str(options.diffusers_dir())
    return out


def backend_json() -> dict[str, Any]:
    """SD.Next's device choice as our backend layer sees it (no probing of other vendors inside SD.Next)."""
    from modules import devices, shared

    from .host import sdnext_backend

    out: dict[str, Any] = {"sdnext": {"backend": devices.backend, "device": str(devices.device),
                                      "dtype": str(devices.dtype).removeprefix("torch."),
                                      "offload_mode": shared.opts.diffusers_offload_mode}}
    try:
        backend = sdnext_backend(devices)
        out["selected"] = dict(backend.summary())
        out["selected"]["reasons"] = list(backend.reasons)
        out["memory"] = {k: v for k, v in vars(backend.memory()).items()}
    except Exception as e:  # e.g. DirectML, which the engine does not support
        out["error"] = str(e)
    return out


def plan_json(lib: library.Library, model: str | None, width: int, height: int, batch: int, vram: str | None) -> dict[str, Any]:
    """The memory plan for one of the folder's pairs at a size (the loaded one, or the first, when not named)."""
    from modules import devices, shared

    from .host import sdnext_backend
    from cascade import memory
    from cascade.loader import resolve_sources
    from cascade.request import build_request
    from cascade.precision import choose_dtypes
    from cascade.session import plan_for_sizes
    from cascade.sizing import sizes_from_sources

    from .loader import requested_dtype
    from .params import resolve_settings

    if not lib.pairs:
        raise LookupError("no Stable Cascade models in the folder: " + " ".join(lib.problems))
    loaded = (_loaded_title() or "").removeprefix("Diffusers/")
    wanted = model or loaded
    pair = next((p for p in lib.pairs if p.name == wanted), None) if wanted else None
    if pair is None and model:
        raise LookupError(f"no Stable Cascade model named {model!r}; known: {', '.join(p.name for p in lib.pairs)}")
    pair = pair or lib.pairs[0]
    backend = sdnext_backend(devices)
    dtypes = choose_dtypes(backend, requested_dtype(devices, shared.opts))
    settings = resolve_settings(lambda key: options.value(key))
    # InvalidRequestError -> HTTP 400: the same bounds as a generation (a huge size would tie up the server)
    request = build_request(prompt="", width=width, height=height, batch_size=batch, compression=settings.compression)
    sizes = sizes_from_sources(resolve_sources(pair.prior, pair.decoder), dtypes)
    plan = plan_for_sizes(sizes, backend, request, vram=vram)
    out = plan.to_dict()
    out.update(model=pair.name, device=str(backend.device), dtypes={k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
               offload_mode=shared.opts.diffusers_offload_mode, text=memory.format_plan(plan))
    if shared.opts.diffusers_offload_mode != "none":
        out["note"] = ("SD.Next's offload mode is set, so SD.Next's offload moves the weights; this plan is what the "
                       "extension would do with offload mode 'none'.")
    return out


def install_error_handler(app) -> None:
    """Answer every `CascadeHostError` (raised out of SD.Next's txt2img and our routes) with SD.Next's error JSON
    and its status, logging one line for an expected error instead of SD.Next's traceback (see extension/errors.py).

    Starlette dispatches to the handler of the most specific exception class, so this one wins over SD.Next's
    catch-all; it copies its handlers when it builds the middleware stack, so the stack is rebuilt on the next
    request (as SD.Next's own setup_middleware does). Installing twice replaces the handler."""
    from starlette.responses import JSONResponse

    async def on_host_error(request, exc: CascadeHostError):
        line = log_line(exc, request.method, request.url.path)
        if exc.expected:
            log.warning(line)
        else:
            log.error(line, exc_info=(type(exc), exc, exc.__traceback__))
        return JSONResponse(status_code=exc.status_code, content=response_body(exc))

    app.add_exception_handler(CascadeHostError, on_host_error)
    app.middleware_stack = None


def register(scan: Callable[[], library.Library], rescan: Callable[[], dict[str, Any]]) -> None:
    """on_app_started: add the routes through SD.Next's API object (its auth and subpath apply)."""
    from fastapi import HTTPException
    from modules import shared

    app = getattr(shared.api, "app", None)
    if app is not None:
        install_error_handler(app)

    def get_models():
        return models_json(scan())

    def post_refresh():
        return rescan()

    def get_backends():
        return backend_json()

    def get_plan(width: int = 1024, height: int = 1024, batch: int = 1, model: str | None = None,
                 vram: str | None = None):
        try:
            return plan_json(scan(), model, width, height, batch, vram)
        except LookupError as e:
            raise HTTPException(status_code=404, detail=str(e)) from e
        except (CascadeError, ValueError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    shared.api.add_api_route(f"{PREFIX}/models", get_models, methods=["GET"])
    shared.api.add_api_route(f"{PREFIX}/refresh", post_refresh, methods=["POST"])
    shared.api.add_api_route(f"{PREFIX}/backends", get_backends, methods=["GET"])
    shared.api.add_api_route(f"{PREFIX}/plan", get_plan, methods=["GET"])
