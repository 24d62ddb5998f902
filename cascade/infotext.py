"""A1111/SD.Next-style "parameters" text: written into every PNG, readable by SD.Next's PNG Info.

Format (the one A1111 and SD.Next write and parse):
    <prompt>
    Negative prompt: <negative>
    Steps: 30, Sampler: DDPM, Schedule type: SGM Uniform, CFG scale: 7, Seed: 7, Size: 1024x1536, ...
Values containing ',' ':' or '"' are JSON-quoted. Stable Cascade's decoder settings use the names SD.Next maps to
its refiner fields for this model (steps -> prior, "Refiner steps" -> decoder), plus explicit Decoder keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .request import GenerationRequest

SAMPLER_TITLES = {
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "lcm": "LCM",
    "uni_pc": "UniPC",
}
SCHEDULER_TITLES = {
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "normal": "Normal",
    "simple": "Simple",
    "beta": "Beta",
}


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _num(value: float) -> str:
    return f"{value:g}"


def build_infotext(
    request: GenerationRequest,
    seed: int,
    *,
    prior_name: str | None = None,
    prior_hash: str | None = None,
    decoder_name: str | None = None,
    decoder_hash: str | None = None,
    dtypes: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The parameters text for one image of `request` (image seed `seed`)."""
    p, d = request.prior, request.decoder
    fields: dict[str, Any] = {
        "Steps": p.steps,
        "Sampler": SAMPLER_TITLES.get(p.sampler, p.sampler),
        "Schedule type": SCHEDULER_TITLES.get(p.scheduler, p.scheduler),
        "CFG scale": _num(p.cfg),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": prior_name,
        "Model hash": prior_hash,
        "Prior shift": _num(p.shift),
        "Refiner steps": d.steps,
        "Image CFG scale": _num(d.cfg),
        "Decoder": decoder_name,
        "Decoder hash": decoder_hash,
        "Decoder sampler": SAMPLER_TITLES.get(d.sampler, d.sampler),
        "Decoder schedule type": SCHEDULER_TITLES.get(d.scheduler, d.scheduler),
        "Decoder shift": _num(d.shift),
        "Compression": _num(request.compression),
        "Stage A scale": _num(request.stage_a_scale),
    }
    if p.denoise != 1.0:
        fields["Denoising strength"] = _num(p.denoise)
    if request.cfg_rescale:
        fields["CFG rescale"] = _num(request.cfg_rescale)
    if request.batch_size > 1:
        fields["Batch size"] = request.batch_size
    if dtypes:
        fields["Dtype"] = " ".join(f"{k}={v}" for k, v in dtypes.items())
    fields.update(extra or {})
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != "")
    text = request.prompt
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"
    return f"{text}\n{line}"


_PAIR = re.compile(r'\s*([\w \-/+.()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111-style parameters back into a dict: 'Prompt', 'Negative prompt' and every key of the last line."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(_PAIR.findall(lines[-1])) >= 3 else ""  # A1111's rule: >= 3 pairs
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


def short_hash(path: str | os.PathLike, cache_file: Path | None = None) -> str:
    """A1111's AutoV2 hash (sha256 of the whole file, first 10 hex), cached by (path, size, mtime)."""
    path = Path(path)
    if path.is_dir():
        return ""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    cache: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(block)
    value = digest.hexdigest()[:10]
    if cache_file is not None:
        cache[key] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".partial")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    return value


def save_png(image, path: str | os.PathLike, parameters: str) -> Path:
    """Write a PNG with the `parameters` text chunk, atomically (no half-written files on interrupt)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(path.name + ".partial")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
