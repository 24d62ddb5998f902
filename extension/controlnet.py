"""Stage C ControlNets per request, chosen by name: SD.Next's `extra.cascade_controlnets` and the server's `controlnets`.

A request never names a file. Each item is JSON:
    {"model": "<name>", "image": "<base64>", "mask": "<base64>" (inpainting; white = repaint),
     "canny": true | [low, high] (edges computed from `image`), "strength": 1.0, "start": 0.0, "end": 1.0}
and becomes one `cascade.controlnet.ControlEntry` of the request's `controlnets` field (the same entry the CLI's
`--controlnet` builds, so the same pixels); strength/start/end ranges are the engine's request validation.

Where the files are (one rule for both hosts): the `ControlNet` subfolder of the model folder, its `*.safetensors`
files named by their stem — in SD.Next `<extension model folder>/ControlNet` (Settings > Stable Cascade; default
`models/StableCascade/ControlNet`), on the server `<--models-dir>/ControlNet`. Not SD.Next's own `models/control/
controlnet` (modules/control/units/controlnet.py find_models): its Control tab lists every file there as a diffusers
ControlNet, where a Stage C file cannot run. The model folder's pairing ignores these files (their role is
"controlnet", neither Stage C nor Stage B).

No SD.Next import at module level: the server (serving/catalog.py) uses the same mapping.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from cascade.errors import CascadeError, InvalidRequestError
from cascade.request import REQUEST_MAX_BYTES as MAX_BYTES, REQUEST_MAX_PIXELS as MAX_PIXELS

FOLDER = "ControlNet"  # the subfolder of the model folder
EXTRA_KEY = "cascade_controlnets"  # SD.Next `extra` key (and the server's `extra` spelling)
ITEM_KEYS = ("model", "image", "mask", "canny", "strength", "start", "end")


def folder_files(folder: Path | None) -> dict[str, Path]:
    """name -> file: the `*.safetensors` files directly in `folder`, named by their stem (none when no folder)."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".safetensors" and p.is_file()}


def _looks_like_path(name: str) -> bool:
    return any(c in name for c in "/\\:") or name.startswith(".") or name.startswith("~")


def find(name: Any, folder: Path | None, where: str, what: str) -> Path:
    """The file of ControlNet `name`; a path, a non-string or an unknown name is refused, listing the known names."""
    files = folder_files(folder)
    known = ", ".join(files) or f"none (put Stage C ControlNet files in {where})"
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{what} needs \"model\": the name of a ControlNet in {where}: {known}")
    if name in files:
        return files[name]
    if _looks_like_path(name):
        raise InvalidRequestError(f"{what} model {name!r} looks like a path; ControlNets are chosen by name only, "
                                  f"from {where}: {known}")
    raise InvalidRequestError(f"{what}: no ControlNet named {name!r} in {where}; known: {known}")


def _number(item: Mapping[str, Any], key: str, default: float, what: str) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{what} {key} {value!r} must be a number")
    return float(value)


def _canny(value: Any, what: str) -> tuple[float, float] | None:
    from cascade.controlnet import CANNY_THRESHOLDS

    if value is None or value is False:
        return None
    if value is True:
        return CANNY_THRESHOLDS
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return float(value[0]), float(value[1])
    raise InvalidRequestError(f"{what} canny {value!r} must be true or [low, high] (e.g. [0.4, 0.8])")


def entry_from_json(item: Any, folder: Path | None, where: str, what: str, max_pixels: int, max_bytes: int):
    """One JSON item -> ControlEntry: the file found by name and classified (headers), images decoded, canny edges
    computed, the mask checked against the type (only the inpainting ControlNet takes one, and it needs one)."""
    from cascade.controlnet import ControlEntry, canny_edges, scan_controlnet
    from cascade.images import decode_base64_image

    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"{what} must be an object: {{\"model\": name, \"image\": base64, ...}}")
    unknown = sorted(str(k) for k in item if k not in ITEM_KEYS)
    if unknown:
        raise InvalidRequestError(f"{what}: unknown field(s) {', '.join(unknown)}; use {', '.join(ITEM_KEYS)}")
    path = find(item.get("model"), folder, where, what)
    cnet = scan_controlnet(path)
    images = {}
    for key in ("image", "mask"):
        data = item.get(key)
        if data is None and key == "mask":
            continue
        if not isinstance(data, str) or not data:
            raise InvalidRequestError(f"{what} {key} must be a base64-encoded image")
        images[key] = decode_base64_image(data, max_pixels, max_bytes, f"{what} {key}")
    inpainting = cnet.config["c_in"] == 4 and cnet.backbone == "effnet"
    if inpainting and "mask" not in images:
        raise InvalidRequestError(f"{what}: {item['model']!r} is an inpainting ControlNet; it needs a \"mask\" "
                                  "(base64, white = repaint)")
    if not inpainting and "mask" in images:
        raise InvalidRequestError(f"{what}: {item['model']!r} is a {cnet.kind} ControlNet; only the inpainting one "
                                  "takes a mask")
    thresholds = _canny(item.get("canny"), what)
    image = images["image"]
    if thresholds is not None:
        try:
            image = canny_edges(image, *thresholds)
        except CascadeError as err:
            raise InvalidRequestError(f"{what}: {err}") from None
    return ControlEntry(str(path), image, _number(item, "strength", 1.0, what), _number(item, "start", 0.0, what),
                        _number(item, "end", 1.0, what), images.get("mask"))


def entries_from_json(value: Any, folder: Path | None, where: str, key: str = EXTRA_KEY,
                      max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> tuple:
    """A request's list of ControlNet items -> ControlEntry tuple (empty for None / []). `where` names the folder
    in messages (a server does not show its paths)."""
    from cascade.controlnet import MAX_CONTROLNETS

    if value is None or value == [] or value == ():
        return ()
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise InvalidRequestError(f"{key} must be a list of ControlNets: [{{\"model\": name, \"image\": base64, "
                                  "\"strength\": 1.0}}]")
    if len(value) > MAX_CONTROLNETS:
        raise InvalidRequestError(f"{key}: {len(value)} ControlNets; at most {MAX_CONTROLNETS}")
    return tuple(entry_from_json(item, folder, where, f"{key}[{i}]", max_pixels, max_bytes)
                 for i, item in enumerate(value))


def sdnext_entries(value: Any) -> tuple:
    """SD.Next: `extra.cascade_controlnets` -> entries, from `<extension model folder>/ControlNet`."""
    from .options import models_dir

    if value is None or value == [] or value == ():
        return ()  # no folder lookup for the requests without ControlNets
    folder = models_dir() / FOLDER
    return entries_from_json(value, folder, str(folder))


def infotext(entries: Sequence[Any]) -> str:
    """The engine's infotext "ControlNet" field (`name strength start-end; ...`), for SD.Next's infotext."""
    from cascade.controlnet import infotext_value

    return infotext_value(entries)
