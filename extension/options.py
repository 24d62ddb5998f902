"""The extension's settings (Settings > Stable Cascade): model folder, default decoder, and the generation settings
SD.Next has no field for. Each is also accepted per request, as `override_settings` or as an `extra` value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from cascade.names import NOISE_MODES, SAMPLER_TITLES, SCHEDULER_TITLES

from .library import AUTOMATIC
from .params import OPTION_KEYS, CascadeSettings

SECTION = ("stable_cascade", "Stable Cascade")
MODELS_DIR = "cascade_models_dir"
DEFAULT_DECODER = "cascade_default_decoder"
FOLDER_NAME = "StableCascade"


def value(key: str, default: Any = None) -> Any:
    """An option's value, usable before the Settings page registered it (at script import time)."""
    from modules import shared

    data = shared.opts.data.get(key)
    return default if data is None or data == "" else data


def models_dir() -> Path:
    """The folder the extension owns: the setting, else `<SD.Next models folder>/StableCascade`."""
    from modules import paths

    configured = value(MODELS_DIR)
    return Path(configured).expanduser() if configured else Path(paths.models_path) / FOLDER_NAME


def diffusers_dir() -> Path:
    """Where SD.Next lists diffusers folders (the same fallback as modules/modelloader.py)."""
    from modules import paths, shared

    place = getattr(shared.opts, "diffusers_dir", None)
    if not place or not os.path.isdir(place):
        place = os.path.join(paths.models_path, "Diffusers")
    return Path(place)


def default_decoder() -> str | None:
    return value(DEFAULT_DECODER, AUTOMATIC)


def register(decoder_choices: Callable[[], list[str]], rescan: Callable[[], None]) -> None:
    """on_ui_settings: add the options. Changing the folder or the default decoder rescans and relists models."""
    import gradio as gr
    from modules import shared

    defaults = CascadeSettings()
    sampler_titles = dict(SAMPLER_TITLES)
    opts = {
        MODELS_DIR: shared.OptionInfo(
            "", f"Model folder (Stage C and Stage B files; empty = models/{FOLDER_NAME})", gr.Textbox, {},
            onchange=rescan),
        DEFAULT_DECODER: shared.OptionInfo(
            AUTOMATIC, "Default decoder (Stage B) for Stage C files with no sidecar or name match", gr.Dropdown,
            lambda: {"choices": decoder_choices()}, onchange=rescan, refresh=rescan),
        OPTION_KEYS["prior_scheduler"]: shared.OptionInfo(
            defaults.prior_scheduler, "Prior (Stage C) schedule", gr.Dropdown,
            {"choices": list(SCHEDULER_TITLES)}),
        OPTION_KEYS["prior_shift"]: shared.OptionInfo(
            defaults.prior_shift, "Prior shift", gr.Slider, {"minimum": 0.5, "maximum": 4.0, "step": 0.1}),
        OPTION_KEYS["decoder_sampler"]: shared.OptionInfo(
            defaults.decoder_sampler, "Decoder (Stage B) sampler", gr.Dropdown, {"choices": list(sampler_titles)}),
        OPTION_KEYS["decoder_scheduler"]: shared.OptionInfo(
            defaults.decoder_scheduler, "Decoder schedule", gr.Dropdown, {"choices": list(SCHEDULER_TITLES)}),
        OPTION_KEYS["decoder_shift"]: shared.OptionInfo(
            defaults.decoder_shift, "Decoder shift", gr.Slider, {"minimum": 0.5, "maximum": 4.0, "step": 0.1}),
        OPTION_KEYS["compression"]: shared.OptionInfo(
            defaults.compression, "Compression (Stage C latent = image size / compression; model card: 42, 32-64)",
            gr.Slider, {"minimum": 16, "maximum": 128, "step": 1}),
        OPTION_KEYS["stage_a_scale"]: shared.OptionInfo(
            defaults.stage_a_scale, "Stage A latent scale (0.43 as trained)", gr.Number, {}),
        OPTION_KEYS["noise"]: shared.OptionInfo(
            defaults.noise, "Noise: cpu (image i = seed + i on any device) or comfyui (the same image as ComfyUI)",
            gr.Radio, {"choices": list(NOISE_MODES)}),
    }
    for key, info in shared.options_section(SECTION, opts).items():
        shared.opts.add_option(key, info)
