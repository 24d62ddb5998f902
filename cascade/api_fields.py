"""SD.Next / A1111 API request fields -> the engine's flat request fields (`cascade.request.build_request`).

One table for every host that speaks SD.Next's API: the standalone server and the batch jobs (serving/) map a
JSON body with `from_sdnext`; the SD.Next extension takes its option keys from `option_key`. Pure functions and
data: no SD.Next, no HTTP, no torch.

SD.Next's own Stable Cascade convention (modules/processing_args.py set_pipeline_args):
    steps -> prior_steps, cfg_scale -> prior_cfg (only when > -1), sampler_name -> prior_sampler ("Default" = the
    model card's), refiner_steps -> decoder_steps, cfg_image -> decoder_cfg (only when given and > -1).
A1111's `scheduler` ("Automatic" = the card's) sets the prior schedule. Settings SD.Next has no field for travel as
the extension's options `cascade_<flat name>` (e.g. `cascade_compression`) in `override_settings` or `extra`;
outside SD.Next they may also be given under their flat names at the top level.

Omitted SD.Next fields take SD.Next's API defaults (modules/processing_class.py: steps 20, cfg_scale 6,
refiner_steps 5, 1024x1024, sampler Default), so a body gives the same image here as through SD.Next with the
extension. Fields that change the image in SD.Next but have no Stable Cascade meaning here (hires fix, subseeds,
tiling, face restore, scripts) are refused when set to anything but their neutral value; every other unknown
field is ignored, as SD.Next's request model ignores unknown fields, and reported back in `ignored`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import InvalidRequestError
from .request import MAX_SEED, request_field_names

OPTION_PREFIX = "cascade_"  # the extension's option keys (Settings > Stable Cascade) are cascade_<flat name>
UNSET = -1  # SD.Next's "use the default" for cfg_scale / cfg_image, and "random" for seed
RANDOM_SEED_RANGE = 4294967294  # SD.Next's get_fixed_seed draws in [0, 2^32 - 2)

# SD.Next field -> flat engine field.
SDNEXT_FIELDS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "batch_size": "batch_size",
    "steps": "prior_steps",
    "cfg_scale": "prior_cfg",
    "sampler_name": "prior_sampler",
    "scheduler": "prior_scheduler",
    "refiner_steps": "decoder_steps",
    "cfg_image": "decoder_cfg",
}
IMG2IMG_FIELDS: dict[str, str] = {"denoising_strength": "prior_denoise"}
# What SD.Next uses when a field is omitted (modules/processing_class.py; ReqImg2Img for denoising_strength).
SDNEXT_DEFAULTS: dict[str, Any] = {"steps": 20, "cfg_scale": 6.0, "refiner_steps": 5, "width": 1024, "height": 1024,
                                   "sampler_name": "Default", "denoising_strength": 0.5}
# Fields accepted only at a neutral value: they would change the image in SD.Next and mean nothing here.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "enable_hr": (False,),
    "subseed_strength": (0, 0.0),
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
    "tiling": (False,),
    "restore_faces": (False,),
    "detailer_enabled": (False,),
    "hidiffusion": (False,),
    "styles": (),
    "script_name": (),
    "script_args": (),
    "alwayson_scripts": (),
    "save_images": (False,),
    "mask": (),
}
# Fields read by the host, not the engine.
HOST_FIELDS = ("n_iter", "send_images", "sd_model_checkpoint", "override_settings", "extra", "force_task_id",
               "sampler_index", "init_images", "include_init_images", "override_settings_restore_afterwards",
               "controlnets")
# Flat fields a JSON body may never set directly: they carry images, which a host decodes itself (a string there
# could be taken for a file path, and no path from a request is ever opened).
IMAGE_FIELDS = ("image", "decoder_image", "image_prompts")
# Flat fields that hold file paths (LoRA files): never from a request body, for the same reason.
PATH_FIELDS = ("loras",)
# ControlNets come by *name*: `controlnets` at the top level or `extra.cascade_controlnets` (SD.Next's spelling), a
# list of {"model": name, "image": base64, ...}; the host finds the names in its own folder and decodes the images
# (extension/controlnet.py), so they travel raw in ApiRequest.controlnets and are never flat fields here.
CONTROLNETS = "controlnets"
CONTROLNETS_OPTION = OPTION_PREFIX + CONTROLNETS
MODEL_OPTION = "sd_model_checkpoint"


def option_key(name: str) -> str:
    """The SD.Next option key of a flat field (`compression` -> `cascade_compression`)."""
    return OPTION_PREFIX + name


def json_fields() -> tuple[str, ...]:
    """The flat engine fields a JSON body may set by name (everything but the image, file and ControlNet inputs)."""
    return tuple(n for n in request_field_names() if n not in IMAGE_FIELDS + PATH_FIELDS + (CONTROLNETS,))


def options_to_fields(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`cascade_<flat>` keys of an options dict -> flat fields; other keys are left to the caller."""
    allowed = set(json_fields())
    out = {}
    for key, value in options.items():
        if not key.startswith(OPTION_PREFIX):
            continue
        name = key[len(OPTION_PREFIX):]
        if name not in allowed:
            raise InvalidRequestError(f"{where}: {key!r} is not a Stable Cascade option; use one of "
                                      f"{', '.join(option_key(n) for n in sorted(allowed))}")
        if value is not None and value != "":
            out[name] = value
    return out


def sdnext_cfg(value: Any, default: float | None, field_name: str) -> float | None:
    """An SD.Next CFG field -> the CFG to use: None or -1 (SD.Next's "default") is `default` (None = the engine's);
    a negative, non-numeric or non-finite value is refused."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == UNSET):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{field_name} {value!r} must be a finite number (or -1 for the default)")
    if value < 0:
        raise InvalidRequestError(f"{field_name} {value!r} is negative: use -1 for the default or a value from 0")
    return float(value)


def resolve_seed(value: Any, draw: Callable[[], int] | None = None) -> int:
    """SD.Next's seed -> the seed used: -1 (or omitted) draws one, as SD.Next does, so it can be reported; any other
    negative or oversized seed is refused."""
    if value is None or value == UNSET:
        return (draw or (lambda: random.randrange(RANDOM_SEED_RANGE)))()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"seed {value!r} is not an integer; use -1 for a random seed or 0..{MAX_SEED}")
    if not 0 <= value <= MAX_SEED:
        raise InvalidRequestError(f"seed {value} must be -1 (random) or between 0 and {MAX_SEED} (2^64-1)")
    return value


def _scheduler_name(value: Any) -> Any:
    """A1111's scheduler "Automatic" is the stage's default, as SD.Next's "Default" sampler is."""
    return "Default" if isinstance(value, str) and value.strip().lower() == "automatic" else value


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """None and empty values are neutral; otherwise the value must equal an allowed one of the same kind (a bool
    is not a number here: `tiling: 0` is not `false`)."""
    if value is None or (isinstance(value, (list, tuple, dict, str)) and not value):
        return True
    return any(isinstance(value, bool) == isinstance(a, bool) and value == a for a in allowed if a is not None)


@dataclass(frozen=True)
class ApiRequest:
    """One SD.Next txt2img/img2img body, mapped. `fields` make one engine batch (`batch_size` images, seeds
    `seed + i`); `n_iter` batches run one after another, batch k starting at seed + k * batch_size (A1111)."""

    fields: dict[str, Any]
    n_iter: int = 1
    model: str | None = None
    send_images: bool = True
    task_id: str | None = None
    init_images: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default_factory=tuple)
    controlnets: tuple[Any, ...] = ()  # the raw JSON items, for the host to resolve by name
    controlnets_key: str = CONTROLNETS  # how the body spelled them (for error messages)

    @property
    def images(self) -> int:
        return self.n_iter * int(self.fields.get("batch_size", 1))

    def iteration(self, k: int) -> dict[str, Any]:
        """The flat fields of batch k (0-based)."""
        return {**self.fields, "seed": int(self.fields["seed"]) + k * int(self.fields.get("batch_size", 1))}


def _int_field(body: Mapping[str, Any], key: str, default: int, lo: int) -> int:
    value = body.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InvalidRequestError(f"{key} {value!r} must be a whole number of at least {lo}")
    return value


def from_sdnext(body: Mapping[str, Any], *, img2img: bool = False, defaults: Mapping[str, Any] | None = None,
                draw_seed: Callable[[], int] | None = None) -> ApiRequest:
    """Map an SD.Next txt2img (or img2img) JSON body. `defaults`: the host's options as flat fields (below the
    request's own values). Raises InvalidRequestError naming the field and the fix."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the request body must be a JSON object")
    table = {**SDNEXT_FIELDS, **(IMG2IMG_FIELDS if img2img else {})}
    flat_names = set(json_fields())
    out: dict[str, Any] = dict(defaults or {})
    ignored: list[str] = []
    for key, value in body.items():
        if key in NEUTRAL:
            if not _neutral(value, NEUTRAL[key]):
                neutral = f"at {NEUTRAL[key][0]!r} " if NEUTRAL[key] else "empty "
                raise InvalidRequestError(f"{key}={value!r} is not supported for Stable Cascade here; leave it "
                                          f"{neutral}or omit it")
        elif key in table or key in HOST_FIELDS:
            continue
        elif key in flat_names:
            clash = [k for k, v in table.items() if v == key and k in body]
            if clash:
                raise InvalidRequestError(f"both {clash[0]!r} (SD.Next) and {key!r} were given; give one of them")
            out[key] = value
        elif key in IMAGE_FIELDS:
            raise InvalidRequestError(f"{key!r} cannot be set by name: send images as base64 in init_images")
        elif key in PATH_FIELDS:
            raise InvalidRequestError(f"{key!r} names files, which a request cannot do: LoRAs over the API are "
                                      "not supported (use the CLI's --lora, or SD.Next's <lora:name:w>)")
        else:
            ignored.append(key)
    # Options: extra and override_settings use the extension's cascade_* keys (request values win over both).
    model = body.get(MODEL_OPTION)
    for where in ("override_settings", "extra"):
        options = body.get(where) or {}
        if not isinstance(options, Mapping):
            raise InvalidRequestError(f"{where} must be a JSON object")
        out.update(options_to_fields({k: v for k, v in options.items()
                                      if not (where == "extra" and k == CONTROLNETS_OPTION)}, where))
        if where == "override_settings" and options.get(MODEL_OPTION):
            model = model or options[MODEL_OPTION]
    for key, name in table.items():
        value = body.get(key, SDNEXT_DEFAULTS.get(key))
        if key not in body and name in out:
            continue  # a flat field or an option gave it; SD.Next's default applies only when nothing did
        if key not in body and key not in SDNEXT_DEFAULTS:
            continue
        if key == "cfg_scale" or key == "cfg_image":
            value = sdnext_cfg(value, None, key)
            if value is None:
                continue  # the engine's default (the model card's)
        if key == "scheduler":
            value = _scheduler_name(value)
        if key == "sampler_name" and "sampler_name" not in body and isinstance(body.get("sampler_index"), str):
            value = body["sampler_index"]  # A1111's older name; SD.Next reads `sampler_name or sampler_index`
        out[name] = value
    out["seed"] = resolve_seed(out.get("seed"), draw_seed)
    n_iter = _int_field(body, "n_iter", 1, 1)
    send_images = body.get("send_images", True)
    if not isinstance(send_images, bool):
        raise InvalidRequestError(f"send_images {send_images!r} must be true or false")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"{MODEL_OPTION} must be a model name (a string)")
    task_id = body.get("force_task_id")
    if task_id is not None and (not isinstance(task_id, str) or not 0 < len(task_id) <= 128):
        raise InvalidRequestError("force_task_id must be a string of 1-128 characters")
    init_images = body.get("init_images") or ()
    if img2img:
        if not isinstance(init_images, (list, tuple)) or not init_images or not all(isinstance(i, str) for i in init_images):
            raise InvalidRequestError("img2img needs init_images: a list with one base64-encoded image")
        if len(init_images) > 1:
            raise InvalidRequestError(f"{len(init_images)} init_images: Stable Cascade starts from one image")
    elif init_images:
        raise InvalidRequestError("init_images were sent to txt2img; use /sdapi/v1/img2img")
    controlnets, controlnets_key = _controlnets(body)
    return ApiRequest(out, n_iter, model or None, send_images, task_id, tuple(init_images), tuple(sorted(ignored)),
                      controlnets, controlnets_key)


def _controlnets(body: Mapping[str, Any]) -> tuple[tuple[Any, ...], str]:
    """The ControlNet items of a body (top-level `controlnets` or `extra.cascade_controlnets`, not both)."""
    extra = body.get("extra") or {}
    given = [(key, value) for key, value in ((CONTROLNETS, body.get(CONTROLNETS)),
                                             (CONTROLNETS_OPTION, extra.get(CONTROLNETS_OPTION)))
             if value not in (None, [], ())]
    if len(given) > 1:
        raise InvalidRequestError(f"both {CONTROLNETS!r} and extra.{CONTROLNETS_OPTION} were given; give one of them")
    if not given:
        return (), CONTROLNETS
    key, value = given[0]
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"{key} must be a list of ControlNets: [{{\"model\": name, \"image\": base64}}]")
    return tuple(value), key
