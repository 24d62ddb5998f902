"""What scripts/stable_cascade.py registers with SD.Next, in one place.

At script import (after SD.Next's model scan, before the UI): wrap the Stable Cascade loader, write the descriptor
folders for the model folder's pairs and relist models when they changed, route our loggers to SD.Next's log
(extension/logs.py).
Callbacks: Settings (on_ui_settings), API routes (on_app_started), undo the wrap (on_script_unloaded).
The Script class only makes SD.Next pass the prompt text to our pipeline (see `prompt_text_script`).
"""

from __future__ import annotations

import logging
from typing import Any

from . import descriptors, hook, library, logs, options, params

log = logging.getLogger(__name__)


def scan() -> library.Library:
    return library.scan_library(options.models_dir(), options.default_decoder())


def sync_models(relist: bool = True) -> dict[str, Any]:
    """Rescan the folder, update the descriptor folders, and relist SD.Next's models when anything changed."""
    lib = scan()
    report = descriptors.sync(lib.pairs, lib.root, options.diffusers_dir())
    for problem in lib.problems + report.problems:
        log.warning("Stable Cascade: %s", problem)
    log.info("Stable Cascade: folder=%s models=%s written=%s removed=%s", lib.root, [p.name for p in lib.pairs],
             report.written, report.removed)
    if relist and report.changed:
        from modules import shared

        shared.refresh_checkpoints()
    from .routes import models_json

    out = models_json(lib)
    out["sync"] = {"written": report.written, "unchanged": report.unchanged, "removed": report.removed,
                   "problems": report.problems}
    return out


def _decoder_choices() -> list[str]:
    return library.decoder_choices(scan())


def register() -> None:
    """Called once per script load by scripts/stable_cascade.py."""
    from modules import script_callbacks

    from . import routes

    logs.route()
    hook.install(options.default_decoder)
    try:
        sync_models(relist=True)
    except OSError as e:  # an unwritable models folder must not stop SD.Next's startup
        log.error("Stable Cascade: cannot write model descriptors: %s", e)
    script_callbacks.on_ui_settings(lambda: options.register(_decoder_choices, lambda *_: sync_models()))
    script_callbacks.on_app_started(lambda _demo, _app: routes.register(scan, sync_models))
    script_callbacks.on_script_unloaded(hook.uninstall)


def prompt_text_script():
    """A Script subclass (built here so that only extension/ imports SD.Next) with one job.

    For our pipeline it sets `p.task_args['prompt']` to the batch's prompt text before SD.Next builds the call
    arguments. SD.Next then skips its own prompt encoder and passes the text (and negative text) through, which the
    engine encodes itself (README, "SD.Next", explains why). It has no UI.
    """
    from modules import scripts, shared

    from .pipeline import StableCascadeSingleFilePipeline

    class StableCascadePromptText(scripts.Script):
        def title(self):
            return "Stable Cascade"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def before_process(self, p, *args, **kwargs):
            params.remember_requested_size(p)  # before SD.Next rounds the size (see params.check_requested_size)

        def process_batch(self, p, *args, **kwargs):
            if isinstance(shared.sd_model, StableCascadeSingleFilePipeline):
                prompts = kwargs.get("prompts") or p.prompts
                p.task_args["prompt"] = list(prompts)

    return StableCascadePromptText
